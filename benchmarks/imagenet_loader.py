"""Images/s of the ImageNet DataModule's training path: read, decode, RandomResizedCrop + flip,
transfer, normalise, with no model, so the number is the data path's ceiling.

    # CPU decoding in worker processes (the default path), on the project's real-data copy:
    python benchmarks/imagenet_loader.py --root ../shared/data/imagenette-mini --workers 0 1 2
    # on a GPU machine, both paths (decode=device: nvJPEG + crops on the GPU):
    python benchmarks/imagenet_loader.py --root /data/imagenet --workers 8 16 --decode cpu device \
        --device cuda --batches 200 --json loader.json

imagenette-mini's images are 224 x 224 JPEGs (about 10 kB); real ImageNet training images average
about 470 x 390 (about 110 kB), so decoding there costs several times more per image.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from mcl_lightning.data import ImageNetDataModule


def measure(args: argparse.Namespace, decode: str, workers: int) -> float:
    dm = ImageNetDataModule(root=args.root, batch_size=args.batch, num_workers=workers, decode=decode,
                            verify_images="none", image_size=args.image_size, seed=0)
    dm.setup("fit")
    device = torch.device(args.device)
    epoch = 0
    dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, world_size=1, global_rank=0)
    loader = dm.train_dataloader()

    def batches():
        nonlocal epoch
        while True:
            loader.sampler.set_epoch(epoch)
            dm.trainer.current_epoch = epoch
            yield from loader
            epoch += 1

    stream = batches()
    seen, start = 0, None
    for step in range(args.warmup + args.batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, seen = time.perf_counter(), 0
        batch = dm.transfer_batch_to_device(next(stream), device, 0)
        images, labels, _ = dm.on_after_batch_transfer(batch, 0)
        seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = seen / (time.perf_counter() - start)
    if workers and loader._iterator is not None:
        loader._iterator._shutdown_workers()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--decode", nargs="+", default=["cpu"], choices=["cpu", "device"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for decode in args.decode:
        for workers in args.workers:
            rate = measure(args, decode, workers)
            rows.append({"decode": decode, "workers": workers, "device": args.device, "images_per_s": round(rate, 1)})
            print(f"decode={decode:6} workers={workers:2} device={args.device}: {rate:8.1f} images/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
