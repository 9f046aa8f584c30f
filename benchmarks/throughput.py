"""Training throughput of mcl_lightning (OKDSystem + Trainer) against a hand-written PyTorch loop.

Both sides train the same PeerNetwork with the same OKD method (identical math), the same SGD
(lr 0.05, momentum 0.9, wd 5e-4, Nesterov), on batches from the same CIFARDataModule with the same
on-device crop/flip/normalise, in one process. Only the steps after the warmup are timed. The
ratio is lightning / plain images/s: 1.0 = parity, < 1 = Lightning slower.

    # CPU (small, a few minutes on 2 cores):
    python benchmarks/throughput.py --data-root ../shared/data --device cpu \
        --backbone resnet20 --peers 2 --steps 10 --warmup 3
    # GPU (the defaults: resnet32, 4 peers, MCL-OKD with K=256, batch 64), fp32 and bf16:
    python benchmarks/throughput.py --data-root ../shared/data --steps 200 --warmup 20 --repeats 3 \
        --json throughput_fp32.json
    python benchmarks/throughput.py --data-root ../shared/data --steps 200 --warmup 20 --repeats 3 \
        --precision bf16 --json throughput_bf16.json

On CUDA, torch.backends.cudnn.benchmark is switched on for both sides (as conf/trainer/gpu.yaml).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mcl_lightning.data import CIFARDataModule, normalize, random_crop_flip
from mcl_lightning.methods import OKDMethod, get_method
from mcl_lightning.models import PeerNetwork
from mcl_lightning.system import OKDSystem

REPO = Path(__file__).resolve().parents[1]
SEED = 0
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)  # OKDSystem's defaults


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace, num_classes: int) -> tuple[PeerNetwork, OKDMethod]:
    """Fresh peers + method from the same seed, so both sides start from identical weights."""
    L.seed_everything(SEED, verbose=False)
    peers = PeerNetwork.from_backbone(args.backbone, args.peers, "shared_trunk", num_classes)
    extra = {"nce_k": args.nce_k} if args.method == "mcl_okd" else {}
    method = get_method(args.method)(**extra)
    method.attach(peers.spec())  # what OKDSystem does; the plain loop needs it too
    return peers, method


def run_plain(args: argparse.Namespace, dm: CIFARDataModule, device: torch.device) -> float:
    """Seconds for the timed steps of a plain PyTorch loop."""
    peers, method = build(args, dm.num_classes)
    method.setup_data(dm.train_labels)
    peers.to(device).train()
    method.to(device).train()
    params = list(peers.parameters()) + list(method.parameters())
    optimizer = torch.optim.SGD(params, **SGD)
    bf16 = args.precision == "bf16"
    total, step, start = args.warmup + args.steps, 0, 0.0
    while step < total:
        for batch in dm.train_dataloader():
            images, labels, indices = (t.to(device, non_blocking=True) for t in batch)
            images = normalize(random_crop_flip(images), dm.mean, dm.std)
            if step == args.warmup:  # timing starts once this step's batch is ready, as on the Lightning side
                sync(device)
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = sum(method(peers(images), labels, indices).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == total:
                break
    sync(device)
    return time.perf_counter() - start


class StepTimer(L.Callback):
    """Times from the start of optimizer step ``warmup`` to the end of step ``total - 1``."""

    def __init__(self, warmup: int, total: int, device: torch.device) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.start, self.elapsed = 0.0, float("nan")

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.total:
            sync(self.device)
            self.elapsed = time.perf_counter() - self.start


def run_lightning(args: argparse.Namespace, dm: CIFARDataModule, device: torch.device) -> float:
    """Seconds for the timed steps of Trainer.fit on an OKDSystem."""
    peers, method = build(args, dm.num_classes)
    # constant LR: the cosine schedule needs max_epochs, and the plain loop has no scheduler either
    system = OKDSystem(peers, method, num_classes=dm.num_classes, scheduler="constant", **SGD)
    timer = StepTimer(args.warmup, args.warmup + args.steps, device)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true", callbacks=[timer],
    )
    trainer.fit(system, datamodule=dm)
    return timer.elapsed


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} torch threads)"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("MCL_DATA_ROOT") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--method", choices=("mcl_okd", "independent"), default="mcl_okd")
    p.add_argument("--nce-k", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("32", "bf16"), default="32")
    p.add_argument("--repeats", type=int, default=1, help="alternate plain/lightning this often; report medians")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("need --steps >= 1, --warmup >= 0 and --repeats >= 1")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning 2.6 vs torch 2.14, harmless
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    dm = CIFARDataModule(root=args.data_root, batch_size=args.batch_size, download=False)
    dm.prepare_data()
    dm.setup("fit")  # decoded once; Trainer.fit's setup reuses the tensors

    seconds: dict[str, list[float]] = {"plain": [], "lightning": []}
    for _ in range(args.repeats):
        seconds["plain"].append(run_plain(args, dm, device))
        seconds["lightning"].append(run_lightning(args, dm, device))

    images = args.steps * args.batch_size
    sides = {
        side: {
            "images_per_s": images / statistics.median(runs),
            "ms_per_step": 1000 * statistics.median(runs) / args.steps,
            "images_per_s_runs": [images / s for s in runs],
        }
        for side, runs in seconds.items()
    }
    ratio = sides["lightning"]["images_per_s"] / sides["plain"]["images_per_s"]
    results = {
        "device": device_name(device),
        "torch_version": torch.__version__,
        "lightning_version": L.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **sides,
        "ratio_lightning_over_plain": ratio,
    }

    print(f"\n{results['device']} | torch {torch.__version__} | lightning {L.__version__}")
    print(f"{args.method} {args.backbone} x{args.peers} nce_k={args.nce_k} batch={args.batch_size} "
          f"precision={args.precision} steps={args.steps} warmup={args.warmup} repeats={args.repeats}")
    print(f"{'side':<10} {'images/s':>10} {'ms/step':>9}")
    for side, r in sides.items():
        print(f"{side:<10} {r['images_per_s']:>10.1f} {r['ms_per_step']:>9.1f}")
    print(f"ratio lightning/plain: {ratio:.3f} (1.0 = parity, < 1 = Lightning slower)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
