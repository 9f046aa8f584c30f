"""Training throughput of the KD machinery against its floor: ``python -m mcl_lightning.bench``'s options,
the run over the tables and the JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mcl_lightning.bench.measure import run_table
from mcl_lightning.bench.settings import Settings, preset, table_settings
from mcl_lightning.bench.tables import device_name, format_table, fused_comparison
from mcl_lightning.core.errors import ConfigError, UserError
from mcl_lightning.data import CIFARDataModule
from mcl_lightning.evaluate import parse_overrides
from mcl_lightning.runtime.perf import PerfOptions
from mcl_lightning.runtime.validation import check_data_root

TABLE_RESERVE_S = 60.0  # a further table starts only with this much of --max-seconds left


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mcl_lightning.bench", description=__doc__.split(":")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "gpu", "gpu_headline", "tiny"), default=None,
                   help="cpu (default on CPU), gpu (default on CUDA: several tables), gpu_headline (the GPU targets' "
                        "rows, about 2.5 minutes), tiny (seconds)")
    p.add_argument("--tables", help="only these tables of the preset, by name, separated by ';'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default=os.environ.get("MCL_DATA_ROOT") or str(Path.cwd().parent / "shared" / "data"))
    p.add_argument("--backbone")
    p.add_argument("--peers", type=int)
    p.add_argument("--topology", choices=("shared_trunk", "independent"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--rows", help="comma-free list separated by ';': e.g. 'independent;mcl_okd@256;*'")
    p.add_argument("--plain", help="rows also run as a plain loop, separated by ';' ('' for none)")
    p.add_argument("--steps", type=int, help="timed steps per run")
    p.add_argument("--warmup", type=int, help="untimed steps before them")
    p.add_argument("--repeats", type=int, help="interleaved repeats (medians)")
    p.add_argument("--precision", choices=("32", "bf16"))
    p.add_argument("--compile", help="false | true | reduce-overhead | max-autotune ...")
    p.add_argument("--compile-backend")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fuse-peers", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device-resident", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--data-batches", type=int)
    p.add_argument("--memory-k", type=int, help="K of the contrastive-memory check (0: skip)")
    p.add_argument("--data-k", help="K values of the data-path rows with negative sampling, separated by ';' ('' for none)")
    p.add_argument("--profile", default="none", help="none | auto (rows that miss a target) | row names separated by ';'")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--omp-passive", action="store_true",
                   help="restart once with OMP_WAIT_POLICY=PASSIVE (CPU): for a busy shared machine; the default "
                        "measures in the threading environment training runs in")
    p.add_argument("--max-seconds", type=float, default=270.0, help="stop repeating (and profiling) past this")
    p.add_argument("--json", type=Path, default=None, help="write every figure and the settings here")
    p.add_argument("data", nargs="*", metavar="data.<option>=<value>",
                   help="CIFAR data module options, as for training: data.root=..., data.check_integrity=false")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> list[Settings]:
    name = args.preset or ("gpu" if args.device.startswith("cuda") else "cpu")
    tables = preset(name, args.device)
    if args.tables:
        wanted = [t for t in args.tables.split(";") if t]
        unknown = sorted(set(wanted) - {t.name for t in tables})
        if unknown:
            raise ConfigError(f"preset {name} has no table {', '.join(unknown)}; it has {', '.join(t.name for t in tables)}")
        tables = [t for t in tables if t.name in wanted]
    overrides: dict[str, Any] = {}
    for key in ("backbone", "peers", "topology", "batch_size", "steps", "warmup", "repeats", "precision", "compile",
                "compile_backend", "channels_last", "fuse_peers", "device_resident", "data_batches", "memory_k"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.rows is not None:
        overrides["rows"] = tuple(r for r in args.rows.split(";") if r)
    if args.plain is not None:
        overrides["plain"] = tuple(r for r in args.plain.split(";") if r)
    if args.data_k is not None:
        overrides["data_k"] = tuple(int(k) for k in args.data_k.split(";") if k)
    out = [replace(t, **overrides) for t in tables]
    for t in out:
        if t.steps < 1 or t.warmup < 1 or t.repeats < 1:
            raise ConfigError("need --steps >= 1, --warmup >= 1 (compilation and allocator warm-up) and --repeats >= 1")
        PerfOptions(compile=t.compile).compile_mode  # validates
    return out


def _reexec_omp_passive(args: argparse.Namespace, argv: list[str] | None) -> None:
    # Only for the command line (argv None): a restarted process cannot return to a caller.
    if not args.omp_passive or not args.device.startswith("cpu") or argv is not None:
        return
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "mcl_lightning.bench", *sys.argv[1:]])


def threading_environment() -> dict[str, Any]:
    """The OpenMP and torch threading the figures were measured under (ratios depend on it)."""
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
            "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m mcl_lightning.bench``: a person's mistake (bad option, missing or unreadable data) is
    one line and exit status 2."""
    try:
        return run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def data_module(args: argparse.Namespace, batch_size: int) -> CIFARDataModule:
    """The CIFAR training data, ``--data-root`` or ``data.root=`` with any other ``data.*`` option."""
    options = {"root": args.data_root, "download": False, **parse_overrides(args.data)}
    check_data_root(options["root"])
    for fixed in ("batch_size", "dataset"):
        if fixed in options:
            raise ConfigError(f"data.{fixed} is set by the benchmark's tables; use --batch-size (CIFAR-100 only)")
    try:
        dm = CIFARDataModule(batch_size=batch_size, **options)
    except TypeError as error:  # an option CIFARDataModule does not have
        raise ConfigError(f"{error}; the benchmark takes CIFARDataModule's options as data.<option>=<value>") from None
    dm.prepare_data()
    dm.setup("fit")
    return dm


def run(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.monotonic()
    args = parse_args(argv)
    _reexec_omp_passive(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = settings_from_args(args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*Tensor Cores.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    dm = data_module(args, tables[0].batch_size)
    deadline = started + args.max_seconds
    results: dict[str, Any] = {
        "device": args.device, "device_name": device_name(device), "torch_version": torch.__version__,
        "lightning_version": L.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"), "threading": threading_environment(),
        "load_average_at_start": _loadavg(), "tables": [],
    }
    for table in tables:
        if time.monotonic() > deadline - TABLE_RESERVE_S and results["tables"]:  # a table's first repeat always runs
            results["tables"].append({"settings": table_settings(table), "skipped_for_time": True, "rows": [],
                                      "data_path": [], "skipped": [], "targets": [], "repeats_done": 0})
            log(f"[{table.name}] skipped: time budget spent")
            continue
        log(f"[{table.name}] running ...")
        dm.batch_size = dm.per_device_batch_size = table.batch_size
        try:
            result = run_table(table, dm, deadline, log, args.profile)
        except Exception as error:  # one table's failure (e.g. a compile error) must not lose the others
            if len(tables) == 1:
                raise
            log(f"[{table.name}] failed: {type(error).__name__}: {error}")
            result = {"settings": table_settings(table), "error": f"{type(error).__name__}: {error}", "rows": [],
                      "data_path": [], "skipped": [], "targets": [], "repeats_done": 0}
        results["tables"].append(result)
        if result["rows"] or result["data_path"]:
            print(format_table(result), flush=True)
    fused = fused_comparison(results["tables"])
    if fused:
        results["fused_vs_loop"] = fused
        if "target" in fused:
            print(f"target {'MET ' if fused['met'] else 'MISSED'} {fused['target']}: {fused['value']:.3f}", flush=True)
        else:
            print(f"{fused['comparison']}: {fused['value']:.3f}", flush=True)
    results["load_average_at_end"] = _loadavg()
    results["wall_seconds"] = time.monotonic() - started
    print(f"{results['device_name']} | torch {results['torch_version']} | lightning {results['lightning_version']} | "
          f"OMP_WAIT_POLICY={results['omp_wait_policy']} | load {results['load_average_at_start']} -> "
          f"{results['load_average_at_end']} | {results['wall_seconds']:.0f} s", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results: {args.json}", flush=True)
    return results


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None

