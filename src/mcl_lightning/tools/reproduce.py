"""The paper's comparison on one device in a wall-time budget: ``python -m mcl_lightning.reproduce``.

    python -m mcl_lightning.reproduce --minutes 8 data.root=/path/to/data            # make reproduce-gpu
    python -m mcl_lightning.reproduce --minutes 8 data.root=/copy data.check_integrity=false
    python -m mcl_lightning.reproduce --minutes 2 --concurrency 1,3 --probe-steps 8 --no-fast-path \\
        trainer=cpu trainer.limit_train_batches=2 ...                                 # a CPU dry run

By default the matrix is the paper's ResNet-32 row: ``cifar100/mcl_okd_resnet32``,
``cifar100/dml_resnet32`` and ``cifar100/baseline_resnet32``, each with its published recipe, seeds 0
and 1, every run on the same number of epochs E of a one-cycle cosine schedule. Small CIFAR networks
leave most of a large GPU idle, so the runs share the device, launched by Hydra's joblib launcher
(``hydra/launcher=joblib``):

1. **Probe** (``mcl_lightning.tools.probe``): each recipe alone, one after another, then c jobs at
   once (the matrix's recipes in turn) for c in ``--concurrency`` (default ``auto``: the most that fit
   the device's memory), every job timed over ``--probe-steps`` steps while all jobs of its level run:
   each job's training images/s, the total, and the gain over the same recipes run one at a time.
2. **Plan**: for each c, the epochs E that fit in what is left of ``--minutes`` when the runs are
   handed out longest first to c workers (``mcl_lightning.tools.study``); the c with the largest E wins.
3. **Study**: ``python -m mcl_lightning.train -m hydra/launcher=joblib hydra.launcher.n_jobs=c
   experiment=... seed=0,1 trainer.max_epochs=E``: each run's results.json, checkpoints and logs. Every
   run is capped with ``trainer.max_time`` at what is left of ``--minutes`` less ``--margin`` (a run the
   cap stopped says ``"stopped_by": "trainer.max_time"``).
4. **Summary**: ``reproduce.json`` (probe, plan, measured wall time and images/s per run, device,
   package versions, gaps; rewritten after the probe, the plan and each finished run, its ``phase``
   saying how far the study got) and ``report.md`` / ``report.csv`` (``mcl_lightning.report``: published
   numbers beside ours) with the gaps of the first recipe to each other (mean over seeds).

Everything goes to ``--out`` (default ``outputs/reproduce/<date>_<time>``). Extra arguments are Hydra
overrides for every run (``data.root=``, ``data.check_integrity=false``, ``trainer=cpu`` ...). On a GPU
the fast path is added unless ``--no-fast-path``: bf16 (``trainer=gpu``), the training set resident
on the GPU, channels_last and identical peers fused (``perf.fuse_peers=auto``); torch.compile stays off
(its compile time would come out of the budget).

(About 300 lines: the four steps above and the summary they feed share one set of options.)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from mcl_lightning.core.errors import ConfigError, UserError
from mcl_lightning.core.outputs import check_no_file_in_the_way, check_output_folder
from mcl_lightning.tools.multirun import StudyFailed, merged, multirun, override_key, read_runs, require_launcher
from mcl_lightning.tools.probe import concurrency_gain, max_time, probe_all
from mcl_lightning.runtime.results import write_results
from mcl_lightning.tools.study import PAPER_MATRIX, costs_at, gaps, plan_epochs

__all__ = ["BudgetTooSmall", "StudyFailed", "main", "parse_args", "study"]

TARGET_EPOCHS = 30
# On a GPU the study runs in the fastest configuration that is safe on a first run: no switch changes the
# maths (equality tests on CPU) or costs compile time; fuse_peers=auto keeps the loop for peers that
# cannot be fused. Ops per step: benchmarks/ops_per_step.py (docs/benchmarks.md). CUDA graphs
# (perf.compile) stay off: nothing measures yet whether their compile time pays within the budget.
FAST_PATH = ["trainer=gpu", "data.device_resident=true", "perf.channels_last=true", "perf.fuse_peers=auto"]
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf", "hydra-joblib-launcher",
            "joblib", "numpy")


class BudgetTooSmall(ConfigError):
    """``--minutes`` leaves no time for the study (gpu_evidence words it in its own options)."""


def run_plan(experiment: str, overrides: list[str], checked_data: set[str]) -> dict[str, Any]:
    """Images per epoch and per evaluation pass of ``experiment`` as the study will run it, after the
    checks a training run makes first (config, network, data folder and files), so that a mistake
    stops the study before any training: one line, exit status 2."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mcl_lightning.runtime.validation import preflight

    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
    preflight(cfg, None)
    data_key = OmegaConf.to_yaml(cfg.data, resolve=True)
    if data_key not in checked_data:  # read the files once: missing, unreadable or altered data is named here
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        checked_data.add(data_key)
    return {"batch_size": int(cfg.data.batch_size), "eval_batch_size": int(cfg.data.get("eval_batch_size", 256)),
            "drop_last": bool(cfg.data.get("drop_last", False)),
            "limit_train_batches": cfg.trainer.get("limit_train_batches", 1.0),
            "limit_val_batches": cfg.trainer.get("limit_val_batches", 1.0)}


def check_recipes(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Every run's overrides (the fast path on a GPU) and each recipe's plan, after the checks a training
    run makes first (``run_plan``): seconds, before any training (gpu_evidence runs them before its benchmark)."""
    import torch

    fast = [] if args.no_fast_path or not torch.cuda.is_available() else FAST_PATH
    overrides = merged(fast, list(args.overrides))
    checked: set[str] = set()
    return overrides, {e: run_plan(e, overrides, checked) for e in args.experiments}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_info() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count()}
    from mcl_lightning.runtime.results import cpu_name

    return {"device": f"CPU: {cpu_name()}", "cuda": None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mcl_lightning.reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of the whole command (probe included)")
    p.add_argument("--margin", type=float, default=30.0, help="seconds kept for start-up of the study and its report")
    p.add_argument("--experiments", default=",".join(PAPER_MATRIX),
                   help="the matrix, comma-separated; the first is compared with each other one")
    p.add_argument("--seeds", default="0,1", help="seeds of every recipe, comma-separated")
    p.add_argument("--concurrency", default="auto",
                   help="concurrent runs to probe, comma-separated, or auto: 1 and the most that fit the device's memory")
    p.add_argument("--probe-steps", type=int, default=150,
                   help="timed training steps of each probe job, all jobs of a level running (after 5 untimed)")
    p.add_argument("--max-epochs", type=int, default=None, help="at most this many epochs, whatever fits")
    p.add_argument("--out", type=Path, default=None, help="folder for everything (default outputs/reproduce/<time>)")
    p.add_argument("--no-fast-path", action="store_true", help=f"do not add {' '.join(FAST_PATH)}")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. data.root=... trainer=cpu")
    args = p.parse_intermixed_args(argv)
    try:
        args.experiments = [e for e in args.experiments.split(",") if e]
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        args.concurrency = (None if args.concurrency == "auto"
                            else sorted({int(c) for c in args.concurrency.split(",") if c} | {1}))
    except ValueError as error:
        raise ConfigError(f"--seeds and --concurrency take whole numbers separated by commas, or auto ({error})") from None
    if not args.experiments or not args.seeds or (args.concurrency is not None and min(args.concurrency) < 1):
        raise ConfigError("need at least one experiment, one seed and concurrency levels >= 1")
    if args.minutes * 60 <= args.margin:
        raise BudgetTooSmall(f"--minutes {args.minutes:g} leaves no time for the study: {args.margin:g} s (--margin) go "
                             f"to its start-up and report, and the probe comes first; pass a larger --minutes")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise ConfigError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.probe_steps < 7:
        raise ConfigError("--probe-steps must be at least 7 (5 warm-up steps are not timed)")
    if args.concurrency is not None and max(args.concurrency) < len(args.experiments):
        raise ConfigError(f"the largest --concurrency must be >= {len(args.experiments)}, the number of recipes, "
                          "so that one probe level measures them all")
    bad = [o for o in args.overrides if override_key(o) in ("experiment", "seed", "hydra.run.dir", "hydra.sweep.dir")]
    if bad:
        raise ConfigError(f"{' '.join(bad)}: use --experiments, --seeds and --out instead")
    require_launcher()
    return args


def choose_plan(levels: list[dict[str, Any]], experiments: list[str], plans: dict[str, dict[str, Any]], seeds: int,
                budget: float, max_epochs: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The plan of every probed concurrency, and the one with the most epochs (then the soonest done)."""
    full = [lv for lv in levels if lv["ok"] and {j["experiment"] for j in lv["jobs"]} >= set(experiments)]
    if not full:
        raise StudyFailed("no probe level that ran every recipe succeeded; see the probe logs")
    # speed ratios between the recipes, from the largest level that ran them all
    reference = {e: statistics.mean(j["images_per_s"] for j in full[-1]["jobs"] if j["experiment"] == e)
                 for e in experiments}
    sizes = {j["experiment"]: j for lv in levels if lv["ok"] for j in lv["jobs"]}
    options = []
    for level in [lv for lv in levels if lv["ok"]]:
        costs = costs_at(level, reference, experiments, plans, sizes)
        epochs, span = plan_epochs(costs, seeds, level["concurrency"], budget, max_epochs)
        options.append({"concurrency": level["concurrency"], "epochs": epochs, "predicted_s": round(span, 1),
                        "order": sorted(experiments, key=lambda e: -costs[e].seconds(epochs)), "fits": span <= budget})
    return options, max(options, key=lambda o: (o["fits"], o["epochs"], -o["predicted_s"]))


def study(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    import torch

    experiments, runs_total = args.experiments, len(args.experiments) * len(args.seeds)
    out = args.out or Path("outputs/reproduce") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    check_no_file_in_the_way(out, "--out")
    if (out / "reproduce.json").exists() or (out / "runs").exists():
        raise ConfigError(f"--out {out} already holds a study; choose another folder")
    overrides, plans = check_recipes(args)  # a mistake stops here, before any training
    check_output_folder(out, "--out")
    print(f"study: {len(experiments)} recipes x {len(args.seeds)} seeds -> {out}", flush=True)
    deadline = started + args.minutes * 60 - args.margin  # every training run ends by then (trainer.max_time)

    # reproduce.json is rewritten after the probe, the plan and every finished run: a study killed at any
    # moment leaves a readable record of what it finished
    record: dict[str, Any] = {
        "matrix": {"experiments": experiments, "seeds": args.seeds}, "budget_minutes": args.minutes,
        **device_info(), "versions": versions(), "overrides": overrides, "phase": "probe",
        "probe": [], "plan": None, "study": None, "gaps": [], "targets": [], "wall_s": None}

    def save(phase: str | None = None) -> None:
        record["phase"] = phase or record["phase"]
        record["wall_s"] = round(time.monotonic() - started, 1)
        write_results(out / "reproduce.json", record)
        print(f"reproduce.json: {record['phase']}, {record['wall_s']:.0f} s", flush=True)

    save()
    device_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    levels = probe_all(out, args.concurrency, experiments, overrides, args.probe_steps, runs_total,
                       lambda: deadline - time.monotonic(), device_bytes,
                       lambda done: (record.update(probe=done), save()))
    budget = deadline - time.monotonic()
    if budget <= 0:
        raise BudgetTooSmall(f"--minutes {args.minutes:g}: the checks and the probe took {time.monotonic() - started:.0f} s, "
                             f"leaving no time for the study (--margin {args.margin:g} s kept); pass a larger --minutes")
    options, best = choose_plan(levels, experiments, plans, len(args.seeds), budget, args.max_epochs)
    record["plan"] = {"options": options, "chosen": best, "budget_s": round(budget, 1)}
    record["targets"] = targets(levels, best, None, torch.cuda.is_available())
    save("study")
    print(f"plan: {best['concurrency']} concurrent runs, {best['epochs']} epochs each, about {best['predicted_s']:.0f} s "
          f"of {budget:.0f} s left; every run capped at {deadline - time.monotonic():.0f} s (trainer.max_time)", flush=True)

    runs_dir = out / "runs"
    order = [e for e in best["order"] for _ in args.seeds]  # the sweep's job order: experiment, then seed
    study_start = time.monotonic()

    def progress() -> None:
        record["study"] = study_record(read_runs(runs_dir), order, None, time.monotonic() - study_start)
        save()

    rc = multirun(runs_dir, out / "runs.log", best["concurrency"],
                  [f"experiment={','.join(best['order'])}", f"seed={','.join(map(str, args.seeds))}"],
                  overrides + [f"trainer.max_epochs={best['epochs']}", max_time(deadline - time.monotonic())],
                  "study", runs_total, on_progress=progress)
    runs = read_runs(runs_dir)
    record["study"] = study_record(runs, order, rc, time.monotonic() - study_start)
    by_experiment: dict[str, list[dict[str, Any]]] = {e: [] for e in experiments}
    for i, name in enumerate(order):
        if i in runs:
            by_experiment[name].append(runs[i])
    record["gaps"] = gaps(by_experiment, experiments[0]) if rc == 0 else []
    record["targets"] = targets(levels, best, record["study"]["runs"], torch.cuda.is_available())
    if runs:
        from mcl_lightning.tools.report import report

        _, md, _ = report(runs_dir, out / "report")
        md.write_text(md.read_text() + "\n" + gaps_markdown(record["gaps"]))
        record["report"] = str(md)
    save("done")
    print(Path(record["report"]).read_text() if runs else "no run finished", flush=True)
    for t in record["targets"]:
        verdict = "not judged (no GPU)" if t["met"] is None else "MET" if t["met"] else "MISSED"
        print(f"target {verdict}: {t['target']}: {t['value']} (goal {t['goal']})", flush=True)
    print(f"{len(runs)}/{runs_total} runs, {best['epochs']} epochs each, in {record['wall_s'] / 60:.1f} min -> "
          f"{out / 'reproduce.json'}", flush=True)
    if rc != 0:
        raise StudyFailed(f"the study's multirun exited with {rc}; its log: {out / 'runs.log'}")
    return record


def study_record(runs: dict[int, dict[str, Any]], order: list[str], rc: int | None, wall: float) -> dict[str, Any]:
    """The study's runs so far (``rc`` None: still running): each run's epochs, time and images/s."""
    per_run = []
    for name, results in [(name, runs[i]) for i, name in enumerate(order) if i in runs]:
        t = results.get("throughput") or {}
        trained = (t.get("train_batches_per_epoch") or 0) * results["global_batch_size"] * results["epochs_run"]
        per_run.append({"experiment": name, "seed": results["seed"], "status": results["status"],
                        "epochs": results["epochs_run"], "stopped_by": results.get("stopped_by"),
                        "wall_time_s": results["wall_time_s"],
                        "train_images_per_s": t.get("train_images_per_s"),  # training steps only
                        "trained_images": trained,
                        "overall_images_per_s": round(trained / results["wall_time_s"], 1) if results["wall_time_s"] else None,
                        "results": results["_path"]})
    # every image every run trained, over the study's wall time: the concurrent runs' total
    return {"exit_status": rc, "finished_runs": len(per_run), "of": len(order), "wall_s": round(wall, 1),
            "runs": per_run, "images_per_s": round(sum(r["trained_images"] for r in per_run) / wall, 1) if wall else None}


def targets(levels: list[dict[str, Any]], chosen: dict[str, Any], runs: list[dict[str, Any]] | None,
            on_gpu: bool) -> list[dict[str, Any]]:
    """The study's targets (judged on a GPU only; elsewhere the figures are a dry run's): the epochs
    planned (``runs``: the fewest any run reached) and the concurrency gain over the same mix one at a time."""
    epochs = chosen["epochs"] if runs is None else min((r["epochs"] for r in runs), default=0)
    what = "planned for every run" if runs is None else "reached by every run"
    out = [{"target": f"at least {TARGET_EPOCHS} epochs {what}", "value": epochs, "goal": TARGET_EPOCHS}]
    level1 = next((lv for lv in levels if lv["concurrency"] == 1), {})
    shared = next((lv for lv in levels if lv["concurrency"] == chosen["concurrency"]), {})
    gain = concurrency_gain(level1, shared) if chosen["concurrency"] > 1 else 1.0
    if gain is not None:
        out.append({"target": "concurrent runs' total images/s >= 2x the same recipes run one at a time",
                    "value": gain, "goal": 2.0, "concurrency": chosen["concurrency"]})
    for t in out:
        t["met"] = t["value"] >= t["goal"] if on_gpu else None
    return out


def gaps_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| gap (deployed peer, test top-1, mean over seeds) | ours | published |", "| --- | ---: | ---: |"]
    fmt = lambda v: "" if v is None else f"{v:+.2f}"  # noqa: E731
    lines += [f"| {r['gap']} | {fmt(r['ours'])} | {fmt(r['published'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    try:
        study(parse_args(argv))
    except StudyFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # a person's mistake (also inside Hydra's composition) is one line; a bug keeps its traceback
        user = user_error_of(error)
        if user is None:
            raise
        print(f"error: {' '.join(str(user).split())}", file=sys.stderr)
        sys.exit(2)


def user_error_of(error: Exception) -> Exception | None:
    """``error`` as a person's mistake (ours, a training run's, or Hydra's composition), else None."""
    from hydra.errors import HydraException

    from mcl_lightning.runtime.validation import user_error

    if isinstance(error, UserError):
        return error
    return user_error(error) or (error if isinstance(error, HydraException) else None)


if __name__ == "__main__":
    main()
