"""One command for a short GPU slot: the benchmark's headline rows, then the comparison study, whole and on time.

    python -m mcl_lightning.gpu_evidence data.root=/data data.check_integrity=false   # make gpu-evidence
    python -m mcl_lightning.gpu_evidence --minutes 4 --bench-seconds 60 --device cpu \\
        --bench-args "--batch-size 8 --steps 1" \\
        --reproduce-args "--concurrency 1,3 --probe-steps 7 --max-epochs 1" trainer=cpu ...   # CPU dry run
    python -m mcl_lightning.gpu_evidence --pack-only --out DIR --work WORK   # after a kill: the archive

0. **Setup** (seconds): the options, the study's recipes and data (as a training run checks them), the
   GPU (CUDA usable from a fresh process; ``nvidia-smi``'s name and compute mode: an exclusive mode
   stops here, since the study's runs share the GPU). A mistake is one line and exit status 2.
1. ``python -m mcl_lightning.bench --preset gpu_headline`` (eager tables first, then the compiled
   ones), killed at ``--bench-seconds``: ``bench.json`` (rewritten after every table).
2. ``python -m mcl_lightning.reproduce`` in what is left of ``--minutes``, killed at the end of it:
   ``reproduce.json`` (rewritten after the probe, the plan and each finished run), ``report.md``.

``--out`` receives at most 5 files, the way a slot that copies back a few files wants them:
``evidence.json`` (the phases' exit status, the GPU, the speed table's targets, the study's plan and
runs, every target met or missed; rewritten after every phase and every finished run), ``bench.json``,
``reproduce.json``, ``report.md`` and ``gpu-evidence.tar.gz``: everything else from ``--work`` (logs,
every run's results.json, metrics and curves), checkpoints left out, under 16 MiB. A SIGTERM (a
``timeout`` around the command) ends the children and still packs; after a SIGKILL, ``--pack-only``
packs what the work folder holds. Checkpoints are removed from ``--work`` at the end unless
``--keep-checkpoints`` (with MCL-OKD's memory banks they weigh hundreds of MB).

Arguments after the options are Hydra overrides for the study; the ``data.*`` ones go to the benchmark too.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mcl_lightning.tools import reproduce
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.core.outputs import check_no_file_in_the_way, check_output_folder
from mcl_lightning.tools.evidence import ARCHIVE, compute_mode_problem, copy_file, nvidia_smi, pack, run_child
from mcl_lightning.tools.multirun import require_launcher
from mcl_lightning.runtime.results import write_results

STUDY_RESERVE_S = 15.0  # the study's own budget ends this long before ours
PACK_RESERVE_S = 10.0  # the study is killed this long before our budget ends: the archive and the summary
BENCH_STOP_S = 20.0  # the benchmark stops starting work this long before it is killed at its share
CUDA_CHECK = "import torch; torch.ones(1, device='{device}').add_(1).sum().item(); print(torch.cuda.get_device_name())"


class Interrupted(Exception):
    """SIGTERM (e.g. ``timeout``): end the children, pack what there is."""


def prune_checkpoints(folder: Path) -> list[Path]:
    """Remove every run's ``checkpoints/`` below ``folder`` (memory banks make them large); the folders removed."""
    removed = sorted(p for p in folder.rglob("checkpoints") if p.is_dir())
    for path in removed:
        shutil.rmtree(path)
    return removed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mcl_lightning.gpu_evidence", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=9.0, help="wall-time budget of both steps together")
    p.add_argument("--bench-seconds", type=float, default=150.0, help="the benchmark's share of the budget (then killed)")
    p.add_argument("--bench-preset", default="gpu_headline", help="the benchmark's preset (tiny: a dry run)")
    p.add_argument("--device", default="cuda", help="the benchmark's device")
    p.add_argument("--bench-args", default="", help="extra options of mcl_lightning.bench, quoted as one")
    p.add_argument("--reproduce-args", default="", help="extra options of mcl_lightning.reproduce, quoted as one")
    p.add_argument("--out", type=Path, default=Path("outputs/gpu-evidence"), help="the summaries and the archive")
    p.add_argument("--work", type=Path, default=None, help="everything else (default: <out>.work)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the study's checkpoints in --work (by default removed: hundreds of MB)")
    p.add_argument("--pack-only", action="store_true", help="only pack --work into --out (after a kill)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the study; data.* also go to the benchmark")
    args = p.parse_intermixed_args(argv)
    args.work = args.work or args.out.with_name(args.out.name + ".work")
    return args


def split_option(text: str, option: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:
        raise ConfigError(f"{option} {text!r}: {error}; quote the options as one, e.g. {option} '--steps 10'") from None


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str], argparse.Namespace]:
    """Every mistake in the options found before the benchmark spends its share of the slot: the study's
    own options (parsed as the study will parse them), the budget, ``--out``. Returns the benchmark's
    extra options, the study's options less ``--minutes`` and the study's parsed options."""
    for option in args.overrides:  # the one mistake both steps would make: one line before either starts
        key, _, value = option.partition("=")
        if key == "data.root" and not Path(value).expanduser().is_dir():
            raise ConfigError(f"data.root={value} is not a folder; point it at the folder that holds cifar-100-python/")
    require_launcher()  # the study's launcher
    for folder, option in ((args.out, "--out"), (args.work, "--work")):
        check_no_file_in_the_way(folder, option)  # created once every check has passed
    if (args.out / "evidence.json").exists() or (args.work / "study").exists():
        raise ConfigError(f"--out {args.out} or --work {args.work} already holds evidence; choose another folder "
                          "(make gpu-evidence EVIDENCE=...)")
    bench_extra = split_option(args.bench_args, "--bench-args")
    extra = split_option(args.reproduce_args, "--reproduce-args")
    for token in extra:
        name = token.split("=", 1)[0]
        if (len(name) >= 3 and "--out".startswith(name)) or (len(name) >= 4 and "--minutes".startswith(name)):
            raise ConfigError(f"--reproduce-args: {token} is set by gpu_evidence; use its own --out and --minutes")
    total = args.minutes * 60
    if args.bench_seconds <= BENCH_STOP_S or args.bench_seconds >= total:
        raise ConfigError(f"--bench-seconds {args.bench_seconds:g} must be > {BENCH_STOP_S:g} and less than --minutes "
                          f"{args.minutes:g} ({total:g} s): the study runs in what is left")
    study = ["--out", str(args.work / "study"), *extra, *args.overrides]
    left_min = (total - args.bench_seconds - STUDY_RESERVE_S - PACK_RESERVE_S) / 60  # if the benchmark takes its share
    try:
        parsed = reproduce.parse_args(["--minutes", f"{left_min:.2f}", *study])
    except reproduce.BudgetTooSmall:
        raise ConfigError(f"--minutes {args.minutes:g} leaves the study {max(left_min, 0) * 60:.0f} s after --bench-seconds "
                          f"{args.bench_seconds:g} and {STUDY_RESERVE_S + PACK_RESERVE_S:g} s reserve, too little for its "
                          "probe and --margin; raise --minutes or lower --bench-seconds") from None
    except ConfigError as error:
        raise ConfigError(f"--reproduce-args / study overrides: {error}") from None
    return bench_extra, study, parsed


def check_setup(args: argparse.Namespace, study: argparse.Namespace) -> dict[str, Any]:
    """The machine and the study's recipes, in seconds: what ``evidence.json`` says under ``setup``."""
    started = time.monotonic()
    cuda = None
    if args.device.startswith("cuda"):  # a fresh process: this one must not hold a CUDA context all along
        cuda = subprocess.Popen([sys.executable, "-c", CUDA_CHECK.format(device=args.device)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    smi = nvidia_smi()
    try:
        reproduce.check_recipes(study)  # config, network and data of every recipe, as a training run checks them
    except Exception as error:
        user = reproduce.user_error_of(error)
        if user is None:
            raise
        raise ConfigError(f"the study's recipes: {' '.join(str(user).split())}") from None
    setup: dict[str, Any] = {"nvidia_smi": smi}
    if cuda is not None:
        out, err = cuda.communicate(timeout=120)
        if cuda.returncode != 0:
            last = (err.strip().splitlines() or ["(no message)"])[-1]
            raise ConfigError(f"--device {args.device}: CUDA is not usable here ({last}); run on a GPU machine, "
                              "or pass --device cpu for a dry run")
        setup["cuda_device"] = out.strip()
        problem = compute_mode_problem(smi, study.concurrency is None or max(study.concurrency) > 1)
        if problem:
            raise ConfigError(problem)
    setup["seconds"] = round(time.monotonic() - started, 1)
    return setup


class Evidence:
    """``evidence.json`` and the files beside it in ``--out``, rewritten as the phases go."""

    def __init__(self, out: Path, work: Path, record: dict[str, Any], started: float | None = None) -> None:
        self.out, self.work, self.record, self.started = out, work, record, started
        self.bench_targets: list[dict[str, Any]] = []
        self.study_targets: list[dict[str, Any]] = []
        self._study_seen: float | None = None

    def save(self) -> None:
        if self.started is not None:
            self.record["wall_s"] = round(time.monotonic() - self.started, 1)
        self.record["targets"] = self.bench_targets + self.study_targets  # every target, met, missed or not judged
        write_results(self.out / "evidence.json", self.record)

    def refresh_study(self) -> None:
        """The study's reproduce.json into ``--out`` and ``evidence.json``, when it has changed."""
        source = self.work / "study" / "reproduce.json"
        if not source.is_file() or source.stat().st_mtime == self._study_seen:
            return
        self._study_seen = source.stat().st_mtime
        copy_file(source, self.out / "reproduce.json")
        record = json.loads(source.read_text())
        self.record["study"] = {**self.record.get("study", {}), "phase": record.get("phase"),
                                "probe": [{k: lv.get(k) for k in ("concurrency", "ok", "total_images_per_s",
                                                                 "concurrency_gain", "overlapped")} for lv in record["probe"]],
                                "plan": (record.get("plan") or {}).get("chosen"), "runs": record.get("study")}
        self.study_targets = record.get("targets", [])
        self.record["gaps"] = record.get("gaps", [])
        self.save()


def bench_summary(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The speed table's targets and a line per table (rows' images/s, compile time, failures)."""
    if not (out / "bench.json").is_file():
        return [], {}
    figures = json.loads((out / "bench.json").read_text())
    targets = [t for table in figures["tables"] for t in table.get("targets", [])]
    if "target" in figures.get("fused_vs_loop", {}):
        targets.append(figures["fused_vs_loop"])
    tables = {t["settings"]["name"]: {"rows": {r["name"]: {"images_per_s": round(r["images_per_s"], 1),
                                                          "compile_s": r.get("compile_s")} for r in t["rows"]},
                                     **({"error": t["error"]} if t.get("error") else {}),
                                     **({"skipped_for_time": True} if t.get("skipped_for_time") else {})}
              for t in figures["tables"]}
    return targets, {"device_name": figures.get("device_name"), "tables": tables, "failures": figures.get("failures", [])}


def finish(evidence: Evidence, keep_checkpoints: bool) -> None:
    """The last copies, the checkpoints pruned, the archive packed, evidence.json written."""
    evidence.refresh_study()
    copy_file(evidence.work / "study" / "report.md", evidence.out / "report.md")
    if not keep_checkpoints and evidence.work.is_dir():
        prune_checkpoints(evidence.work)
    evidence.record["archive"] = pack(evidence.work, evidence.out / ARCHIVE) if evidence.work.is_dir() else None
    evidence.save()
    print(f"gpu-evidence: {evidence.out} ({', '.join(sorted(p.name for p in evidence.out.iterdir()))})", flush=True)


def pack_only(args: argparse.Namespace) -> None:
    path = args.out / "evidence.json"
    record = json.loads(path.read_text()) if path.is_file() else {"phase": "unknown (no evidence.json)"}
    if record.get("phase") != "done":
        record["phase"] = f"killed during {record.get('phase')} (packed by --pack-only)"
    args.out.mkdir(parents=True, exist_ok=True)
    evidence = Evidence(args.out, args.work, record)
    evidence.bench_targets = bench_summary(args.out)[0]  # the study's come from its reproduce.json in finish()
    finish(evidence, keep_checkpoints=True)


def _sigterm(*_: Any) -> None:
    raise Interrupted()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    if args.pack_only:
        pack_only(args)
        return {}
    try:
        bench_extra, study_args, study = check_args(args)
        setup = check_setup(args, study)
        out, work = check_output_folder(args.out, "--out"), check_output_folder(args.work, "--work")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    evidence = Evidence(out, work, {"phase": "benchmark", "setup": setup, "bench": None, "study": {},
                                    "work": str(work)}, started)
    gpu = (setup["nvidia_smi"].get("gpus") or [{}])[0]
    print(f"gpu-evidence: setup checked in {setup['seconds']:.0f} s; GPU {gpu.get('name', '(none)')}, "
          f"compute mode {gpu.get('compute_mode', '-')}", flush=True)
    evidence.save()
    previous = signal.signal(signal.SIGTERM, _sigterm)
    deadline = started + args.minutes * 60
    bench_rc = study_rc = None
    try:
        data = [o for o in args.overrides if o.startswith("data.")]
        bench = [sys.executable, "-m", "mcl_lightning.bench", "--preset", args.bench_preset, "--device", args.device,
                 "--max-seconds", str(args.bench_seconds - BENCH_STOP_S), "--json", str(out / "bench.json"),
                 *bench_extra, *data]
        bench_rc = run_child(bench, work / "bench.log", started + args.bench_seconds)
        evidence.bench_targets, summary = bench_summary(out)
        evidence.record.update(phase="study",
                               bench={"exit_status": bench_rc, "killed_at_time_limit": bench_rc is None, **summary})
        evidence.save()
        left_min = (deadline - time.monotonic() - STUDY_RESERVE_S - PACK_RESERVE_S) / 60
        command = [sys.executable, "-m", "mcl_lightning.reproduce", "--minutes", f"{left_min:.2f}", *study_args]
        study_rc = run_child(command, work / "study.log", deadline - PACK_RESERVE_S, on_line=evidence.refresh_study)
        evidence.record["phase"] = "done"
    except Interrupted:
        evidence.record["phase"] = f"killed by SIGTERM during {evidence.record['phase']}"
    finally:
        signal.signal(signal.SIGTERM, previous)
        evidence.record["study"] = {**evidence.record["study"], "exit_status": study_rc,
                                    "killed_at_time_limit": study_rc is None and evidence.record["phase"] == "done"}
        finish(evidence, args.keep_checkpoints)
    print(f"gpu-evidence: benchmark exit {bench_rc}, study exit {study_rc}, {evidence.record['wall_s'] / 60:.1f} min "
          f"-> {out}", flush=True)
    if evidence.record["phase"] != "done" or bench_rc != 0 or study_rc != 0:
        sys.exit(1 if evidence.record["phase"] == "done" else 124)
    return evidence.record


if __name__ == "__main__":
    main()
