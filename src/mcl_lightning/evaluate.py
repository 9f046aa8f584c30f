"""Evaluate a checkpoint on the full test set, on one device: every peer, the peer mean, the ensemble.

    python -m mcl_lightning.evaluate <run dir>/checkpoints/last.ckpt [data.root=/path/to/data] [--out eval.json]

Peers, method and data settings come from the checkpoint (no Hydra, no repeated arguments); ``data.*``
overrides change the data module's settings (typically ``data.root=`` on another machine). Prints
top-1/top-5 and writes them as JSON (default: ``<checkpoint>.eval.json`` beside the checkpoint). From
Python: ``evaluate(path, {"root": ...})`` returns the same dict.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException

from mcl_lightning.core.errors import ConfigError, UserError
from mcl_lightning.core.outputs import check_output_file
from mcl_lightning.runtime.checkpointing import read_checkpoint
from mcl_lightning.runtime.results import nest_metrics, write_results
from mcl_lightning.system import OKDSystem
from mcl_lightning.runtime.validation import check_data_root

DEFAULT_DATAMODULE = "mcl_lightning.data.cifar.CIFARDataModule"


def build_datamodule(checkpoint: dict[str, Any], overrides: dict[str, Any] | None = None) -> L.LightningDataModule:
    """The training run's data module (class and settings from the checkpoint), with ``overrides``."""
    target = checkpoint.get("datamodule_class") or DEFAULT_DATAMODULE
    module_name, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    known = set(inspect.signature(cls).parameters) | set(saved)
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"unknown data option {', '.join('data.' + k for k in unknown)} for {name}; "
                          f"its options: {', '.join(sorted(known))}")
    for key in ("dataset", "num_classes"):  # the peers' classifiers are fixed by the checkpoint
        if key in (overrides or {}) and key in saved and overrides[key] != saved[key]:
            raise ConfigError(f"data.{key}={overrides[key]}: the checkpoint was trained with data.{key}={saved[key]}, "
                              f"and its classifiers test on that; leave data.{key} unset")
    return cls(**{**saved, **(overrides or {})})


def evaluate(path: str | Path, data_overrides: dict[str, Any] | None = None, accelerator: str = "auto",
             precision: str | None = None) -> dict[str, Any]:
    """Top-1/top-5 of every peer, the peer mean and the ensemble on the whole test set."""
    path = Path(path)
    checkpoint = read_checkpoint(path)  # memory-mapped: cheap; a clear error before the data are checked
    check_data_root((data_overrides or {}).get("root"))
    system = OKDSystem.from_checkpoint(path)
    datamodule = build_datamodule(checkpoint, data_overrides)
    try:
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision or checkpoint.get("precision", "32-true"),
                            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except (MisconfigurationException, ValueError) as error:  # no such device here, an unknown precision
        raise ConfigError(f"--accelerator {accelerator} --precision {precision or 'as trained'}: {error} "
                          "(e.g. --accelerator cpu, --precision 32-true)") from None
    trainer.test(system, datamodule=datamodule, verbose=False)
    return {
        "checkpoint": str(path),
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "dataset": getattr(datamodule, "dataset", None),
        "test_images": len(datamodule.test_dataset) if getattr(datamodule, "test_dataset", None) is not None else None,
        "test": nest_metrics(system.test_results),
    }


def format_evaluation(result: dict[str, Any]) -> str:
    test = result["test"]
    peers = sorted((g for g in test if g.startswith("peer") and g[4:].isdigit()), key=lambda g: int(g[4:]))
    lines = [f"{result['checkpoint']} (epoch {result['epoch']}, step {result['global_step']}): "
             f"{result['test_images']} test images", f"{'':10} {'top1':>7} {'top5':>7}"]
    for name in [*peers, "peer_mean", "ensemble"]:
        if name in test:
            lines.append(f"{name:10} {100 * test[name]['top1']:7.2f} {100 * test[name].get('top5', float('nan')):7.2f}")
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``data.root=/x data.eval_batch_size=512`` -> ``{"root": "/x", "eval_batch_size": 512}``."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("data."):
            raise ConfigError(f"unknown argument {item!r}; pass data.<option>=<value> (e.g. data.root=/path/to/data)")
        overrides[key.removeprefix("data.")] = yaml.safe_load(value) if value else None
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("overrides", nargs="*", help="data.<option>=<value>, e.g. data.root=/path/to/data")
    parser.add_argument("--out", type=Path, help="where to write the JSON (default: <checkpoint>.eval.json)")
    parser.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda", "mps"),
                        help="one device (default: auto)")
    parser.add_argument("--precision", help="default: the training run's precision")
    args = parser.parse_intermixed_args(argv)  # data.root=... before or after the options
    out = args.out or args.checkpoint.with_name(args.checkpoint.name + ".eval.json")
    try:
        check_output_file(out, "--out", inputs=(args.checkpoint,))  # before the test pass, not after it
        result = evaluate(args.checkpoint, parse_overrides(args.overrides), args.accelerator, args.precision)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    out = write_results(out, result)
    print(format_evaluation(result))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
