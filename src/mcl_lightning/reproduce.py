"""The paper's recipe in a fixed wall-time budget: as many epochs of a shortened cosine schedule as fit.

    python -m mcl_lightning.reproduce --minutes 8 data.root=../shared/data            # or: make reproduce-gpu
    python -m mcl_lightning.reproduce --minutes 1 --probe-steps 3 trainer=cpu ...      # a CPU dry run

1. Probe: builds the run's exact network, method and data from the same config and times
   ``--probe-steps`` training steps after ``--warmup-steps`` (images/s of the real step, data path
   included).
2. Plans: epochs E = how many (training + one validation pass) fit in the budget, less a margin for
   start-up and the final test pass; the cosine schedule is then one cycle over E epochs.
3. Trains: ``python -m mcl_lightning.train <recipe> trainer.max_epochs=E <your overrides>``, the
   normal entry point (results.json, checkpoints, logs in its run directory), and writes
   ``reproduce.json`` beside results.json: the probe's images/s, the plan, the measured wall time and
   the training images/s, and the device.

The default recipe is the paper's ResNet-32 x 4 MCL-OKD row (``experiment=mcl_okd_cifar100_resnet32``)
on one GPU in bf16 (``trainer=gpu``) with the training set resident on the GPU (``data.device_resident=true``)
and channels_last. Extra arguments are Hydra overrides for both the probe and the run.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mcl_lightning.errors import ConfigError, UserError
from mcl_lightning.system import OKDSystem
from mcl_lightning.train import build_network

# bf16 (trainer=gpu) and the fastest data path: the training set resident on the device with augmentation
# there, and channels_last. torch.compile is left off: its compile time would come out of the budget.
DEFAULT_RECIPE = ["experiment=mcl_okd_cifar100_resnet32", "trainer=gpu", "data.device_resident=true",
                  "perf.channels_last=true"]


class _StepClock(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, None, None

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        self._sync(module)
        self.end = time.perf_counter()


def probe(overrides: list[str], warmup: int, steps: int) -> dict[str, Any]:
    """Images/s of the configured training step (same network, method, data, precision, device)."""
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(cfg.seed, verbose=False)
    peers, method = build_network(cfg)
    datamodule = instantiate(cfg.data)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    optim["scheduler"] = "constant"  # the probe has no epochs to schedule over
    system = OKDSystem(peers, method, num_classes=datamodule.num_classes, **optim)
    clock = _StepClock(warmup)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(max_steps=warmup + steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = instantiate(trainer_cfg, logger=False, callbacks=[clock])
    trainer.fit(system, datamodule=datamodule)
    if clock.start is None or clock.end is None or clock.end <= clock.start:
        raise ConfigError("the probe ran no timed step: raise --probe-steps or the data size")
    seconds = clock.end - clock.start
    return {
        "images_per_s": steps * datamodule.batch_size / seconds,
        "train_size": len(datamodule.train_labels),
        "eval_size": _eval_size(datamodule),
        "batch_size": datamodule.batch_size,
        "device": _device_name(system.device),
    }


def _eval_size(datamodule: L.LightningDataModule) -> int:
    loader = datamodule.val_dataloader()
    return len(loader.dataset) if hasattr(loader, "dataset") else 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def plan_epochs(minutes: float, images_per_s: float, train_size: int, eval_size: int, margin_s: float) -> int:
    """Epochs of (train + validation) that fit in ``minutes`` less ``margin_s``, at least 1.

    Evaluation is counted at 3x the training rate (forward only, no backward), plus one final
    test pass inside the margin.
    """
    per_epoch = train_size / images_per_s + eval_size / (3 * images_per_s)
    budget = minutes * 60 - margin_s - eval_size / (3 * images_per_s)
    return max(1, math.floor(budget / per_epoch))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of the training run")
    parser.add_argument("--margin", type=float, default=45.0, help="seconds kept for start-up and the test pass")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--no-recipe", action="store_true", help=f"do not prepend {' '.join(DEFAULT_RECIPE)}")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.root=... hydra.run.dir=...")
    args = parser.parse_args(argv)
    overrides = ([] if args.no_recipe else list(DEFAULT_RECIPE)) + args.overrides
    try:
        probe_overrides = [o for o in overrides if not o.startswith("hydra.")]
        measured = probe(probe_overrides, args.warmup_steps, args.probe_steps)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    epochs = plan_epochs(args.minutes, measured["images_per_s"], measured["train_size"], measured["eval_size"],
                         args.margin)
    print(f"probe: {measured['images_per_s']:.0f} images/s on {measured['device']}; "
          f"{epochs} epochs fit in {args.minutes:g} minutes", flush=True)
    command = [sys.executable, "-m", "mcl_lightning.train", *overrides, f"trainer.max_epochs={epochs}"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        sys.exit(proc.returncode)
    results_path = Path(proc.stdout.rsplit("results: ", 1)[-1].split()[0])
    results = json.loads(results_path.read_text())
    record = {
        "device": measured["device"],
        "torch_version": torch.__version__,
        "budget_minutes": args.minutes,
        "probe_images_per_s": measured["images_per_s"],
        "epochs": epochs,
        "wall_s": wall,
        "overall_images_per_s": epochs * measured["train_size"] / wall,  # whole run: evaluation and start-up included
        "command": command[1:],
        "results": str(results_path),
        "test_top1": {name: results["test"].get(name, {}).get("top1")
                      for name in (f"peer{results['peers'] - 1}", "peer_mean", "ensemble")},
    }
    out = results_path.with_name("reproduce.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{epochs} epochs in {wall / 60:.1f} min ({record['overall_images_per_s']:.0f} images/s overall) -> {out}")


if __name__ == "__main__":
    main()
