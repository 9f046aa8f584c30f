"""Aten ops per training step of the study's recipes, counted with torch.profiler on the CPU.

    python benchmarks/ops_per_step.py                       # the study's three recipes, its configuration
    python benchmarks/ops_per_step.py --plain               # the same recipes without the study's speed switches
    python benchmarks/ops_per_step.py --experiments cifar100/mcl_okd_resnet32 perf.fuse_peers=false

Each recipe is built the way ``mcl_lightning.train`` builds it (``train.build``: perf switches, callbacks,
logging) and trained through Lightning's Trainer on real CIFAR-100 batches; the profiler records
``--steps`` whole training steps (data, forward, loss, backward, optimiser, callbacks and ``self.log``)
after ``--warmup`` steps. A GPU runs one kernel per leaf op, or more, so on an eager, launch-bound
GPU step the count is the launch count's order of magnitude.

Figures, per step:
* ``ops``: ``aten::`` ops called from Python or by autograd, i.e. with no ``aten::`` op above them (the
  figure docs/benchmarks.md records and issue 24's target counts);
* ``aten_events``: every ``aten::`` event, the ops those dispatch to included (``aten::linear`` ->
  ``aten::t`` + ``aten::addmm``).

The study's configuration is ``mcl_lightning.tools.reproduce.FAST_PATH`` (what ``reproduce`` adds on a GPU)
with ``trainer=gpu`` replaced by its CPU equivalent (bf16 autocast): the same ops as on the GPU up to
the ones autocast treats differently on the two devices. ``--plain`` leaves the fast path out.
Data: ``MCL_DATA_ROOT`` or ``../shared/data`` (``--data-root``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mcl_lightning.tools.reproduce import FAST_PATH
from mcl_lightning.tools.study import PAPER_MATRIX

CPU_FOR_GPU = {"trainer=gpu": ["trainer=cpu", "trainer.precision=bf16-mixed"]}


def study_overrides() -> list[str]:
    """The study's GPU overrides, as the CPU can run them."""
    return [o for override in FAST_PATH for o in CPU_FOR_GPU.get(override, [override])]


class _StepProfiler(L.Callback):
    """Profiles from the start of training batch ``warmup`` to the start of batch ``warmup + steps``
    (or the end of training), so every op of those steps is inside, the optimiser's and the hooks' too."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.profiler: Any = None
        self.done = False

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
        elif batch_idx == self.warmup + self.steps:
            self._stop()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.profiler is not None and not self.done:
            self.profiler.__exit__(None, None, None)
            self.done = True


def count_ops(experiment: str, overrides: list[str], warmup: int = 3, steps: int = 4) -> dict[str, Any]:
    """Aten ops per training step of ``experiment`` with ``overrides`` (see the module docstring)."""
    from hydra import compose, initialize_config_module

    from mcl_lightning.train import build

    fixed = ["trainer.max_epochs=1", f"trainer.limit_train_batches={warmup + steps + 1}", "trainer.limit_val_batches=0",
             "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=true", "logger=none", "data.num_workers=0"]
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides, *fixed])
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        datamodule, system, trainer = build(cfg, Path(tmp), None)
        probe = _StepProfiler(warmup, steps)
        trainer.callbacks.append(probe)
        trainer.fit(system, datamodule=datamodule)
    events = [e for e in probe.profiler.events() if e.name.startswith("aten::")]
    top = [e for e in events if not _has_aten_parent(e)]
    names = Counter(e.name for e in top)
    return {
        "experiment": experiment, "overrides": overrides, "steps": steps, "warmup": warmup,
        "ops": round(len(top) / steps), "aten_events": round(len(events) / steps),
        "ops_by_name": {name: round(n / steps, 1) for name, n in names.most_common(25)},
    }


def _has_aten_parent(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default=",".join(PAPER_MATRIX), help="comma-separated recipes (experiment=...)")
    p.add_argument("--plain", action="store_true", help="without the study's fast path")
    p.add_argument("--steps", type=int, default=4, help="profiled steps per recipe (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data-root", default=os.environ.get("MCL_DATA_ROOT", "../shared/data"))
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every recipe, after the study's")
    args = p.parse_args(argv)
    base = [] if args.plain else study_overrides()
    overrides = [*base, f"data.root={args.data_root}", "data.check_integrity=false", *args.overrides]
    rows = [count_ops(e, overrides, args.warmup, args.steps) for e in args.experiments.split(",") if e]
    print(f"{'recipe':34} {'ops/step':>9} {'aten events/step':>17}")
    for row in rows:
        print(f"{row['experiment']:34} {row['ops']:>9} {row['aten_events']:>17}")
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
