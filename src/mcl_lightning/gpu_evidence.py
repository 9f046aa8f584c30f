"""One command for a short GPU lease: the benchmark's headline rows, then the comparison study.

    python -m mcl_lightning.gpu_evidence data.root=/data data.check_integrity=false   # make gpu-evidence
    python -m mcl_lightning.gpu_evidence --minutes 3 --device cpu --bench-args "--batch-size 8 --steps 1 ..." \\
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

from mcl_lightning.core.errors import ConfigError
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    for option in args.overrides:  # the one mistake both steps would make: one line before either starts
        key, _, value = option.partition("=")
        if key == "data.root" and not Path(value).expanduser().is_dir():
            print(f"error: data.root={value} is not a folder; point it at the folder that holds cifar-100-python/",
                  file=sys.stderr)
            sys.exit(2)
    try:  # the study's launcher, checked before the benchmark spends its share of the lease
        require_launcher()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    out: Path = args.out
    if (out / "evidence.json").exists() or (out / "study").exists():
        print(f"error: --out {out} already holds evidence; choose another folder (make gpu-evidence EVIDENCE=...)",
              file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    data = [o for o in args.overrides if o.startswith("data.")]
    bench = [sys.executable, "-m", "mcl_lightning.bench", "--preset", args.bench_preset, "--device", args.device,
             "--max-seconds", str(args.bench_seconds), "--json", str(out / "bench.json"),
             *shlex.split(args.bench_args), *data]
    bench_rc = stream(bench, out / "bench.log")
    left_min = (args.minutes * 60 - (time.monotonic() - started) - STUDY_RESERVE_S) / 60
    study = [sys.executable, "-m", "mcl_lightning.reproduce", "--minutes", f"{left_min:.2f}", "--out", str(out / "study"),
             *shlex.split(args.reproduce_args), *args.overrides]
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
