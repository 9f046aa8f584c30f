"""One command for a short GPU lease: the benchmark's headline rows, then the comparison study.

    python -m mcl_lightning.gpu_evidence data.root=/data data.check_integrity=false   # make gpu-evidence
    python -m mcl_lightning.gpu_evidence --minutes 4 --bench-seconds 60 --device cpu \\
        --bench-args "--batch-size 8 --steps 1" \\
        --reproduce-args "--concurrency 1,3 --probe-steps 7 --max-epochs 1" trainer=cpu ...   # CPU dry run

1. ``python -m mcl_lightning.bench --preset gpu_headline`` (MCL-OKD K = 256 at batch 64 and 256 with the
   fast switches against the cross-entropy floor, fused against looped independent peers), at most
   ``--bench-seconds``: ``bench.json``, ``bench.log``.
2. ``python -m mcl_lightning.reproduce`` in the rest of ``--minutes``: ``study/`` (every run's
   results.json, ``reproduce.json``, ``report.md``), ``study.log``.
3. ``evidence.json``: where everything is, both steps' exit status and the targets, met or missed.

The runs' checkpoints are removed at the end (``--keep-checkpoints`` keeps them): with MCL-OKD's memory
banks they weigh hundreds of MB, and the folder is meant to be committed as it is.

Everything lands in ``--out`` (default ``outputs/gpu-evidence``), ready to commit. Arguments after
the options are Hydra overrides for the study; the ``data.*`` ones go to the benchmark too.
Both steps run as child processes, so one failing (say, a compile error in the benchmark) still
leaves the other's results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mcl_lightning import reproduce
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.core.outputs import check_no_file_in_the_way, check_output_folder
from mcl_lightning.runtime.multirun import require_launcher

STUDY_RESERVE_S = 15.0  # the study's own budget ends this long before ours


def stream(command: list[str], log: Path) -> int:
    """Run ``command``, its output both on our stdout and in ``log``; its exit status."""
    with log.open("w") as file:
        file.write(" ".join(shlex.quote(c) for c in command) + "\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            file.write(line)
        return proc.wait()


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
    p.add_argument("--bench-seconds", type=float, default=150.0, help="the benchmark's share of the budget")
    p.add_argument("--bench-preset", default="gpu_headline", help="the benchmark's preset (tiny: a dry run)")
    p.add_argument("--device", default="cuda", help="the benchmark's device")
    p.add_argument("--bench-args", default="", help="extra options of mcl_lightning.bench, quoted as one")
    p.add_argument("--reproduce-args", default="", help="extra options of mcl_lightning.reproduce, quoted as one")
    p.add_argument("--out", type=Path, default=Path("outputs/gpu-evidence"))
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the study's checkpoints (by default removed: hundreds of MB, nothing to commit)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the study; data.* also go to the benchmark")
    return p.parse_intermixed_args(argv)


def split_option(text: str, option: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as error:
        raise ConfigError(f"{option} {text!r}: {error}; quote the options as one, e.g. {option} '--steps 10'") from None


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Every mistake found before the benchmark spends its share of the lease: the study's own options
    (parsed as the study will parse them), the budget, ``--out``. Returns the benchmark's extra options
    and the study's options less ``--minutes``."""
    for option in args.overrides:  # the one mistake both steps would make: one line before either starts
        key, _, value = option.partition("=")
        if key == "data.root" and not Path(value).expanduser().is_dir():
            raise ConfigError(f"data.root={value} is not a folder; point it at the folder that holds cifar-100-python/")
    require_launcher()  # the study's launcher
    check_no_file_in_the_way(args.out, "--out")  # created once every check has passed
    if (args.out / "evidence.json").exists() or (args.out / "study").exists():
        raise ConfigError(f"--out {args.out} already holds evidence; choose another folder (make gpu-evidence EVIDENCE=...)")
    bench_extra = split_option(args.bench_args, "--bench-args")
    extra = split_option(args.reproduce_args, "--reproduce-args")
    for token in extra:
        name = token.split("=", 1)[0]
        if (len(name) >= 3 and "--out".startswith(name)) or (len(name) >= 4 and "--minutes".startswith(name)):
            raise ConfigError(f"--reproduce-args: {token} is set by gpu_evidence; use its own --out and --minutes")
    total = args.minutes * 60
    if args.bench_seconds <= 0 or args.bench_seconds >= total:
        raise ConfigError(f"--bench-seconds {args.bench_seconds:g} must be > 0 and less than --minutes {args.minutes:g} "
                          f"({total:g} s): the study runs in what is left")
    study = ["--out", str(args.out / "study"), *extra, *args.overrides]
    left_min = (total - args.bench_seconds - STUDY_RESERVE_S) / 60  # if the benchmark takes its whole share
    try:
        reproduce.parse_args(["--minutes", f"{left_min:.2f}", *study])
    except reproduce.BudgetTooSmall:
        raise ConfigError(f"--minutes {args.minutes:g} leaves the study {max(left_min, 0) * 60:.0f} s after --bench-seconds "
                          f"{args.bench_seconds:g} and {STUDY_RESERVE_S:g} s reserve, too little for its probe and "
                          "--margin; raise --minutes or lower --bench-seconds") from None
    except ConfigError as error:
        raise ConfigError(f"--reproduce-args / study overrides: {error}") from None
    return bench_extra, study


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        bench_extra, study_args = check_args(args)
        out = check_output_folder(args.out, "--out")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    data = [o for o in args.overrides if o.startswith("data.")]
    bench = [sys.executable, "-m", "mcl_lightning.bench", "--preset", args.bench_preset, "--device", args.device,
             "--max-seconds", str(args.bench_seconds), "--json", str(out / "bench.json"),
             *bench_extra, *data]
    bench_rc = stream(bench, out / "bench.log")
    left_min = (args.minutes * 60 - (time.monotonic() - started) - STUDY_RESERVE_S) / 60
    study = [sys.executable, "-m", "mcl_lightning.reproduce", "--minutes", f"{left_min:.2f}", *study_args]
    study_rc = stream(study, out / "study.log")
    if not args.keep_checkpoints:
        removed = prune_checkpoints(out / "study")
        print(f"removed {len(removed)} checkpoint folders under {out / 'study'} (--keep-checkpoints keeps them)", flush=True)
    evidence: dict[str, Any] = {"bench": {"exit_status": bench_rc, "json": "bench.json", "log": "bench.log"},
                                "study": {"exit_status": study_rc, "folder": "study", "log": "study.log"},
                                "wall_s": round(time.monotonic() - started, 1), "targets": []}
    if (out / "bench.json").is_file():
        figures = json.loads((out / "bench.json").read_text())
        evidence["device"] = figures.get("device_name")
        evidence["targets"] += [t for table in figures["tables"] for t in table.get("targets", [])]
        if "target" in figures.get("fused_vs_loop", {}):
            evidence["targets"].append(figures["fused_vs_loop"])
    if (out / "study" / "reproduce.json").is_file():
        record = json.loads((out / "study" / "reproduce.json").read_text())
        evidence["targets"] += record.get("targets", [])
        evidence["gaps"] = record.get("gaps", [])
    (out / "evidence.json").write_text(json.dumps(evidence, indent=2, default=str) + "\n")
    print(f"gpu-evidence: benchmark exit {bench_rc}, study exit {study_rc}, {evidence['wall_s'] / 60:.1f} min -> {out}",
          flush=True)
    if bench_rc or study_rc:
        sys.exit(bench_rc or study_rc)
    return evidence


if __name__ == "__main__":
    main()
