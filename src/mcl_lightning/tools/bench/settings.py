"""The benchmark's tables: presets, their settings and their rows."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.methods import get_method, list_methods
from mcl_lightning.runtime.perf import PerfOptions

SEED = 0
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)  # OKDSystem's defaults
DEFAULT_ROWS = ("independent", "mcl_okd@256", "mcl_okd@16384", "*")  # "*": every other registered method


@dataclass
class Settings:
    """One table: one network, one precision, one set of speed switches."""

    name: str = "cpu"
    device: str = "cpu"
    backbone: str = "resnet32"
    peers: int = 4
    topology: str = "shared_trunk"
    batch_size: int = 64
    rows: tuple[str, ...] = DEFAULT_ROWS
    plain: tuple[str, ...] = ("mcl_okd@256",)  # also run as a hand-written loop (Lightning vs plain)
    steps: int = 5
    warmup: int = 1
    repeats: int = 4
    precision: str = "32"  # 32 | bf16 (autocast; the contrastive term stays float32)
    compile: bool | str = False
    compile_backend: str = "inductor"
    compile_method: bool = False  # also torch.compile each method's forward
    channels_last: bool = False
    fuse_peers: bool = False
    device_resident: bool = False
    drop_last: bool = False
    data_batches: int = 60  # batches per data-path measurement (a quarter of that at K >= 4096)
    data_k: tuple[int, ...] = (256, 16384)
    memory_k: int = 16384  # the contrastive-memory check (0 = skip)
    targets: str = "cpu"  # which targets apply: cpu | gpu | none

    def perf(self) -> PerfOptions:
        return PerfOptions(fuse_peers=self.fuse_peers, channels_last=self.channels_last, compile=self.compile,
                           compile_backend=self.compile_backend, compile_method=self.compile_method)


def preset(name: str, device: str) -> list[Settings]:
    """The tables a preset runs, the eager ones first (a compile error or a long compilation cannot
    cost them). ``cpu``: the issue's CPU settings. ``gpu``: the paper's batch with the fast switches,
    batch 256, fused against looped independent peers, and the eager baseline. ``tiny``: resnet20 x2
    at batch 8, a few steps (seconds; the test suite runs it)."""
    tables = _preset(name, device)
    return sorted(tables, key=lambda t: PerfOptions(compile=t.compile).compile_mode is not None)  # stable


def _preset(name: str, device: str) -> list[Settings]:
    if name == "cpu":
        return [Settings(device=device)]
    if name == "tiny":
        return [Settings(name="tiny", device=device, backbone="resnet20", peers=2, batch_size=8,
                         rows=("independent", "mcl_okd@64"), plain=("mcl_okd@64",), steps=2, warmup=1, repeats=1,
                         data_batches=4, data_k=(64,), memory_k=512, targets="none")]
    if name == "gpu_headline":  # make gpu-evidence: the targets' rows only, in about 2.5 minutes
        fast = dict(device=device, precision="bf16", compile="reduce-overhead", channels_last=True,
                    device_resident=True, drop_last=True, steps=100, warmup=20, repeats=1, memory_k=0, plain=())
        # fused vs loop eager (bf16): two compilations fewer, and eager is where fusing the peers matters
        eager = {**fast, "compile": False, "topology": "independent", "batch_size": 256, "rows": ("independent",),
                 "data_k": (), "targets": "none"}
        return [
            Settings(name="gpu_paper_batch64", rows=("mcl_okd@256",), data_k=(256,), targets="gpu", **fast),
            Settings(name="gpu_batch256", batch_size=256, rows=("mcl_okd@256",), data_k=(), targets="gpu", **fast),
            Settings(name="gpu_independent_loop_b256", **eager),
            Settings(name="gpu_independent_fused_b256", fuse_peers=True, **eager),
        ]
    if name == "gpu":
        fast = dict(device=device, precision="bf16", compile="reduce-overhead", channels_last=True,
                    device_resident=True, drop_last=True, steps=200, warmup=30, repeats=3, data_batches=400)
        # in order of priority: the time budget skips the last tables first
        return [
            Settings(name="gpu_paper_batch64", targets="gpu", **fast),
            Settings(name="gpu_batch256", batch_size=256, rows=("independent", "mcl_okd@256"), plain=(),
                     memory_k=0, data_k=(256,), targets="gpu", **fast),
            Settings(name="gpu_independent_loop_b256", topology="independent", batch_size=256, rows=("independent",),
                     plain=(), memory_k=0, data_k=(), targets="none", **{**fast, "repeats": 2}),
            Settings(name="gpu_independent_fused_b256", topology="independent", batch_size=256, rows=("independent",),
                     plain=(), memory_k=0, data_k=(), fuse_peers=True, targets="none", **{**fast, "repeats": 2}),
            Settings(name="gpu_eager_fp32_b64", device=device, rows=("independent", "mcl_okd@256"), plain=(),
                     memory_k=0, data_k=(256,), steps=100, warmup=10, repeats=2, targets="none"),
            Settings(name="gpu_shared_fused_b64", rows=("mcl_okd@256",), plain=(), memory_k=0, data_k=(),
                     fuse_peers=True, targets="none", **{**fast, "repeats": 2}),
            Settings(name="gpu_compiled_method_b64", rows=("mcl_okd@256",), plain=(), memory_k=0, data_k=(),
                     compile_method=True, targets="none", **{**fast, "repeats": 2}),
        ]
    raise ConfigError(f"unknown preset {name!r}: cpu, gpu, gpu_headline or tiny")


@dataclass
class RowSpec:
    label: str
    method: str | None  # None: the floor
    options: dict[str, Any] = field(default_factory=dict)
    plain: bool = False  # a hand-written loop (else: through OKDSystem + Trainer)


def parse_row(text: str) -> tuple[str, dict[str, Any]]:
    """``name``, ``name@K`` (nce_k=K) or ``name:key=value,key=value``."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    if "@" in name:
        name, k = name.split("@", 1)
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"--rows {text}: K after @ must be a whole number >= 1, e.g. {name}@256")
        options["nce_k"] = int(k)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value) if value[:1] in "0123456789-[{tfn\"" else value
        except ValueError:
            raise ConfigError(f"--rows {text}: {item} is not key=value with a number, list or word") from None
    if name not in list_methods():
        raise ConfigError(f"--rows/--plain {text}: unknown method {name!r}; choose one of: {', '.join(list_methods())}")
    return name, options


def check_rows(settings: Settings) -> None:
    """Every row's method built with its options, before anything is measured: an unknown method or
    option is the user's mistake, not a row to skip."""
    for text in [r for r in settings.rows if r != "*"] + list(settings.plain):
        name, options = parse_row(text)
        try:
            get_method(name)(**options)
        except TypeError as error:
            raise ConfigError(f"--rows/--plain {text}: {name} {error}; see its options with "
                              f"help(mcl_lightning.methods.get_method({name!r}))") from None


def row_specs(settings: Settings) -> list[RowSpec]:
    explicit = [r for r in settings.rows if r != "*"]
    names = [parse_row(r)[0] for r in explicit]
    if "*" in settings.rows:
        explicit += [m for m in list_methods() if m not in names]
    rows = [RowSpec("floor (plain CE loop)", None, plain=True)]
    for text in explicit:
        name, options = parse_row(text)
        rows.append(RowSpec(_label(name, options), name, options))
    for text in settings.plain:
        name, options = parse_row(text)
        rows.append(RowSpec(_label(name, options) + " (plain loop)", name, options, plain=True))
    return rows


def _label(name: str, options: dict[str, Any]) -> str:
    extra = [f"K={v}" if k == "nce_k" else f"{k}={v}" for k, v in options.items()]
    return " ".join([name, *extra])


def table_settings(s: Settings) -> dict[str, Any]:
    d = asdict(s)
    d["rows"], d["plain"], d["data_k"] = list(s.rows), list(s.plain), list(s.data_k)
    d["compile"] = PerfOptions(compile=s.compile).compile_mode or False
    d["statistic"] = "median over repeats"
    return d

