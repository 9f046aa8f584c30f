"""Training throughput of the KD machinery against its floor: ``python -m mcl_lightning.bench``'s options,
the run over the tables and the JSON."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mcl_lightning.tools.bench.measure import run_table
from mcl_lightning.tools.bench.settings import Settings, check_rows, preset, row_specs, table_settings
from mcl_lightning.tools.bench.tables import device_name, format_table, fused_comparison
from mcl_lightning.core.errors import ConfigError, UserError
from mcl_lightning.core.outputs import check_output_file
from mcl_lightning.data import CIFARDataModule
from mcl_lightning.data.paths import default_data_root
from mcl_lightning.evaluate import parse_overrides
from mcl_lightning.models import PeerNetwork
from mcl_lightning.runtime.perf import PerfOptions
from mcl_lightning.runtime.results import write_results

TABLE_RESERVE_S = 60.0  # a further table starts only with this much of --max-seconds left


def _number(kind: type, low: float, strict: bool = False) -> Any:
    """An argparse type: a ``kind`` number >= ``low`` (> when ``strict``), else a one-line usage error."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _k_values(text: str) -> tuple[int, ...]:
    values = [k.strip() for k in text.split(";") if k.strip()]
    if not all(k.isdigit() and int(k) >= 1 for k in values):
        raise argparse.ArgumentTypeError(f"{text!r}: K values are whole numbers >= 1 separated by ';', e.g. '256;16384'")
    return tuple(int(k) for k in values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mcl_lightning.bench", description=__doc__.split(":")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("cpu", "gpu", "gpu_headline", "tiny"), default=None,
                   help="cpu (default on CPU), gpu (default on CUDA: several tables), gpu_headline (the GPU targets' "
                        "rows, about 2.5 minutes), tiny (seconds)")
    p.add_argument("--tables", help="only these tables of the preset, by name, separated by ';'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:<index> (default: cuda when a GPU is usable)")
    p.add_argument("--data-root", default=None,
                   help="the folder that holds cifar-100-python/ (default: $MCL_DATA_ROOT, else the per-user data folder)")
    p.add_argument("--backbone")
    p.add_argument("--peers", type=_number(int, 1))
    p.add_argument("--topology", choices=("shared_trunk", "independent"))
    p.add_argument("--batch-size", type=_number(int, 1))
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
    p.add_argument("--data-batches", type=_number(int, 1))
    p.add_argument("--memory-k", type=_number(int, 0), help="K of the contrastive-memory check (0: skip)")
    p.add_argument("--data-k", type=_k_values, help="K values of the data-path rows with negative sampling, separated by ';' ('' for none)")
    p.add_argument("--profile", default="none", help="none | auto (rows that miss a target) | row names separated by ';'")
    p.add_argument("--threads", type=_number(int, 1), default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--omp-passive", action="store_true",
                   help="restart once with OMP_WAIT_POLICY=PASSIVE (CPU): for a busy shared machine; the default "
                        "measures in the threading environment training runs in")
    p.add_argument("--max-seconds", type=_number(float, 0, strict=True), default=270.0, help="stop repeating (and profiling) past this")
    p.add_argument("--json", type=Path, default=None, help="write every figure and the settings here")
    p.add_argument("data", nargs="*", metavar="data.<option>=<value>",
                   help="CIFAR data module options, as for training: data.root=..., data.check_integrity=false")
    return p.parse_intermixed_args(argv)


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
        overrides["data_k"] = args.data_k
    out = [replace(t, **overrides) for t in tables]
    networks = set()
    for t in out:
        if t.steps < 1 or t.warmup < 1 or t.repeats < 1:
            raise ConfigError("need --steps >= 1, --warmup >= 1 (compilation and allocator warm-up) and --repeats >= 1")
        PerfOptions(compile=t.compile).compile_mode  # validates
        check_rows(t)
        networks.add((t.backbone, t.peers, t.topology))
    for backbone, peers, topology in networks:  # milliseconds: a wrong --backbone or --peers before any table
        try:
            PeerNetwork.from_backbone(backbone, peers, topology, 100)
        except ConfigError as error:
            raise ConfigError(f"--backbone {backbone} --peers {peers} --topology {topology}: {error}") from None
    check_profile(args.profile, out)
    return out


def check_profile(profile: str, tables: list[Settings]) -> None:
    """``--profile``: none, auto, or row names of the tables (as the printed table names them)."""
    if profile in ("none", "auto"):
        return
    labels = {row.label for t in tables for row in row_specs(t)}
    unknown = sorted({name.strip() for name in profile.split(";")} - labels)
    if unknown:
        raise ConfigError(f"--profile: no row named {', '.join(map(repr, unknown))}; use none, auto or row names "
                          f"separated by ';': {'; '.join(sorted(labels))}")


def check_device(text: str) -> torch.device:
    """``--device`` as a device this machine has: one line, before any work, when it is not."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {text} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {text}: the benchmark runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: no usable GPU here (no NVIDIA driver or CUDA build); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


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
    one line and exit status 2; a table or row that failed is in the JSON (``failures``) and exit status 1."""
    try:
        results = run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if results["failures"]:  # measured and written, but not whole: a caller (gpu_evidence, CI) must see it
        print(f"error: {len(results['failures'])} table(s) or row(s) failed: " + "; ".join(results["failures"]),
              file=sys.stderr)
        sys.exit(1)
    return results


def data_root(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Path, str]:
    """The data folder and where it came from: ``data.root=``, ``--data-root``, ``$MCL_DATA_ROOT`` or the
    per-user default (as training's)."""
    for value, origin in ((overrides.get("root"), "data.root="), (args.data_root, "--data-root "),
                          (os.environ.get("MCL_DATA_ROOT"), "MCL_DATA_ROOT=")):
        if value not in (None, ""):
            return Path(str(value)).expanduser(), f"{origin}{value}"
    root = default_data_root()
    return root, f"the default data folder {root} (no --data-root, data.root= or MCL_DATA_ROOT given)"


def data_module(args: argparse.Namespace, batch_size: int) -> CIFARDataModule:
    """The CIFAR training data, ``--data-root`` or ``data.root=`` with any other ``data.*`` option."""
    overrides = parse_overrides(args.data)
    root, origin = data_root(args, overrides)
    if not root.is_dir():
        raise ConfigError(f"{origin} is not a folder; pass --data-root /path/to/data, the folder that holds "
                          "cifar-100-python/ (or set MCL_DATA_ROOT)")
    options = {**overrides, "root": str(root), "download": False}
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
    check_device(args.device)
    _reexec_omp_passive(args, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = settings_from_args(args)
    if args.json is not None:  # written at the end: a folder or a file in the way fails now, not then
        check_output_file(args.json, "--json")
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
        "load_average_at_start": _loadavg(), "tables": [], "failures": [],
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
        except UserError:  # the user's mistake: every table would fail
            raise
        except Exception as error:  # one table's failure (e.g. a compile error) must not lose the others
            log(f"[{table.name}] failed: {type(error).__name__}: {error}\n{traceback.format_exc()}")
            result = {"settings": table_settings(table), "error": f"{type(error).__name__}: {error}", "rows": [],
                      "data_path": [], "skipped": [], "targets": [], "repeats_done": 0}
        results["tables"].append(result)
        if result["rows"] or result["data_path"] or result.get("failed"):
            print(format_table(result), flush=True)
        results["failures"] = failures(results["tables"])
        if args.json is not None:  # after every table: a benchmark killed at its time limit keeps what it measured
            write_results(args.json, results)
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
        write_results(args.json, results)
        print(f"results: {args.json}", flush=True)
    return results


def failures(tables: list[dict[str, Any]]) -> list[str]:
    """Every table that failed and every row that raised, one line each (empty: all ran)."""
    out = [f"table {t['settings']['name']}: {t['error']}" for t in tables if t.get("error")]
    out += [f"{t['settings']['name']} / {row['name']}: {row['error']}" for t in tables for row in t.get("failed", [])]
    return out


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None

