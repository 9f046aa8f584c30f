"""Per-epoch means over seeds for the proxy study (docs/results.md), from each run's metrics.csv.

    python docs/results/per_epoch.py docs/results/proxy

Prints two markdown tables: the deployed (last) peer's and the ensemble's validation top-1 (%) after
each validated epoch (the test set, unless the run held out part of the training set), and the weighted loss terms of the last epoch (train/loss/*, epoch means) with the
deployed peer's training top-1 in that epoch.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from mcl_lightning.tools.curves import read_epoch_series


def epoch_rows(metrics: Path) -> dict[int, dict[str, float]]:
    """{epoch: {metric: value}}: the training log read by mcl_lightning.tools.curves, turned per epoch."""
    merged: dict[int, dict[str, float]] = {}
    for key, by_epoch in read_epoch_series(metrics).items():
        for epoch, value in by_epoch.items():
            merged.setdefault(epoch, {})[key] = value
    return merged


def main(root: Path) -> None:
    variants = sorted(p for p in root.iterdir() if p.is_dir())
    curves, losses = {}, {}
    for variant in variants:
        runs = sorted(variant.glob("seed*/metrics.csv"))
        if not runs:
            continue
        peers = json.loads((runs[0].parent / "results.json").read_text())["peers"]
        per_run = [epoch_rows(m) for m in runs]
        epochs = sorted({e for r in per_run for e in r if f"val/peer{peers - 1}/top1" in r[e]})
        curves[variant.name] = (len(runs), {
            e: (statistics.mean(100 * r[e][f"val/peer{peers - 1}/top1"] for r in per_run),
                statistics.mean(100 * r[e]["val/ensemble/top1"] for r in per_run)) for e in epochs})
        last = [r[epochs[-1]] for r in per_run]
        losses[variant.name] = {k.removeprefix("train/loss/"): statistics.mean(r[k] for r in last)
                                for k in sorted(last[0]) if k.startswith("train/loss/")}
        # Training top-1 of the deployed peer (augmented batches, epoch mean): is the proxy still underfitting?
        losses[variant.name]["train top-1 (%)"] = statistics.mean(100 * r[f"train/peer{peers - 1}/top1"] for r in last)
    validated = sorted({e for _, values in curves.values() for e in values})
    print("| variant (n) | " + " | ".join(f"epoch {e + 1}" for e in validated) + " |")
    print("|" + " --- |" * (len(validated) + 1))
    for name, (n, values) in curves.items():
        cells = [f"{values[e][0]:.2f} / {values[e][1]:.2f}" if e in values else "-" for e in validated]
        print(f"| {name} ({n}) | " + " | ".join(cells) + " |")
    print("\nDeployed peer / ensemble, validation top-1 (%) after each validated epoch, mean over seeds.\n")
    terms = sorted({t for v in losses.values() for t in v}, key=lambda t: (t.startswith("train"), t))
    print("| variant | " + " | ".join(terms) + " |")
    print("|" + " --- |" * (len(terms) + 1))
    for name, values in losses.items():
        print(f"| {name} | " + " | ".join(f"{values[t]:.3f}" if t in values else "-" for t in terms) + " |")
    print("\nLast epoch, mean over its steps and over seeds: the weighted loss terms (summed over peers) and the\n"
          "deployed peer's top-1 on its augmented training batches.")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/proxy"))
