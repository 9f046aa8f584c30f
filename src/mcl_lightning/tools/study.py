"""The arithmetic of a comparison study on one device: probe figures -> concurrency and epochs -> gaps.

Pure functions (no training, no files), used by ``mcl_lightning.reproduce`` and tested on their own.

* A run costs ``startup_s + E * epoch_s + test_s`` seconds, with ``epoch_s`` = its training images per
  epoch at the images/s it reached in the probe at the same concurrency, plus one evaluation pass
  counted at three times the training rate (forward only).
* The launcher hands the runs out in sweep order to whichever worker is free (joblib), so the study
  lasts the makespan of that greedy list schedule; the sweep is ordered longest run first.
* The chosen concurrency is the one whose plan fits the most epochs in the budget.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

PAPER_MATRIX = ("cifar100/mcl_okd_resnet32", "cifar100/dml_resnet32", "cifar100/baseline_resnet32")
EVAL_SPEEDUP = 3.0  # evaluation images/s relative to training images/s (forward only)


@dataclass(frozen=True)
class RunCost:
    """What one run of a recipe costs at one concurrency level."""

    experiment: str
    images_per_s: float  # this run's own training images/s while sharing the device
    train_images_per_epoch: int
    eval_images: int  # one validation pass (and the final test pass)
    startup_s: float  # process start to the first timed step, and the end of the run

    @property
    def epoch_s(self) -> float:
        return (self.train_images_per_epoch + self.eval_images / EVAL_SPEEDUP) / self.images_per_s

    def seconds(self, epochs: int) -> float:
        return self.startup_s + epochs * self.epoch_s + self.eval_images / (EVAL_SPEEDUP * self.images_per_s)


def probe_slots(experiments: Sequence[str], concurrency: int) -> list[str]:
    """The recipes of a probe at ``concurrency`` runs: the matrix's recipes in turn."""
    return [experiments[i % len(experiments)] for i in range(concurrency)]


def makespan(seconds: Iterable[float], workers: int) -> float:
    """Wall time of jobs handed out in order to ``workers`` workers, each to the first one free."""
    free = [0.0] * workers
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def fill_costs(measured: dict[str, list[float]], reference: dict[str, float], experiments: Sequence[str]) -> dict[str, float]:
    """Images/s of every recipe at one level: measured where the probe ran it, otherwise scaled from
    the recipes it did run by their speed ratio at the ``reference`` level (one that ran them all)."""
    have = {e: statistics.mean(v) for e, v in measured.items() if v}
    if not have:
        raise ValueError("a probe level measured no run")
    out = {}
    for e in experiments:
        out[e] = have[e] if e in have else statistics.mean(have[m] * reference[e] / reference[m] for m in have)
    return out


def order_longest_first(costs: dict[str, RunCost], epochs: int = 100) -> list[str]:
    """Recipes ordered by run time, longest first (the list schedule's best simple order)."""
    return sorted(costs, key=lambda e: -costs[e].seconds(epochs))


def plan_epochs(costs: dict[str, RunCost], seeds: int, workers: int, budget_s: float,
                max_epochs: int | None = None) -> tuple[int, float]:
    """The most epochs E (at least 1, at most ``max_epochs``) whose schedule ends within ``budget_s``,
    and that schedule's predicted makespan."""
    order = order_longest_first(costs)

    def span(epochs: int) -> float:
        return makespan([costs[e].seconds(epochs) for e in order for _ in range(seeds)], workers)

    epochs = 1
    while (max_epochs is None or epochs < max_epochs) and span(epochs + 1) <= budget_s:
        epochs += 1
    return epochs, span(epochs)


def deployed_test_top1(results: dict[str, Any]) -> float | None:
    """Test top-1 (%) of the peer a user deploys (the last one) with the final weights."""
    value = results.get("test", {}).get(f"peer{results['peers'] - 1}", {}).get("top1")
    return None if value is None else 100 * value


def published_top1(results: dict[str, Any]) -> float | None:
    error = ((results.get("reference") or {}).get("top1_error") or {}).get("peer")
    return None if error is None else 100 - error


def gaps(runs: dict[str, list[dict[str, Any]]], subject: str) -> list[dict[str, Any]]:
    """``subject`` minus every other recipe: deployed-peer test top-1, mean over seeds, ours and published."""
    def mean(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    ours = {e: mean([deployed_test_top1(r) for r in rs]) for e, rs in runs.items()}
    paper = {e: mean([published_top1(r) for r in rs]) for e, rs in runs.items()}
    out = []
    for other in runs:
        if other == subject:
            continue
        diff = lambda d: None if d.get(subject) is None or d.get(other) is None else round(d[subject] - d[other], 2)  # noqa: E731
        out.append({"gap": f"{subject} - {other}", "ours": diff(ours), "published": diff(paper),
                    "seeds": {subject: len(runs[subject]), other: len(runs[other])},
                    "ours_top1": {subject: ours[subject], other: ours[other]},
                    "published_top1": {subject: paper[subject], other: paper[other]}})
    return out


def limited(images: int, batch: int, limit: float | int | None, drop_last: bool = False) -> int:
    """Images a pass over ``images`` covers in batches of ``batch`` under Lightning's ``limit_*_batches``."""
    batches = images // batch if drop_last else -(-images // batch)
    if isinstance(limit, int) and not isinstance(limit, bool):  # a count of batches
        return min(images, limit * batch)
    return min(images, int(batches * float(1.0 if limit is None else limit)) * batch)  # a fraction


def costs_at(level: dict[str, Any], reference: dict[str, float], experiments: list[str],
             plans: dict[str, dict[str, Any]], sizes: dict[str, dict[str, Any]]) -> dict[str, RunCost]:
    """Each recipe's RunCost at one probe level (``sizes``: a probe job of the recipe; ``plans``: its
    batch sizes and limits as the study runs it)."""
    measured: dict[str, list[float]] = {}
    startup: list[float] = []
    for job in level["jobs"]:
        measured.setdefault(job["experiment"], []).append(job["images_per_s"])
        startup.append(job["startup_s"])
    speeds = fill_costs(measured, reference, experiments)
    out = {}
    for e in experiments:
        p, s = plans[e], sizes[e]
        out[e] = RunCost(e, speeds[e], limited(s["train_dataset_size"], p["batch_size"], p["limit_train_batches"], p["drop_last"]),
                         limited(s["val_dataset_size"] or 0, p["eval_batch_size"], p["limit_val_batches"]), max(startup))
    return out
