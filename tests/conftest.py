"""Shared fixtures: where the real data lives, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_data_root() -> Path | None:
    """MCL_DATA_ROOT, else ../shared/data beside the checkout (as the README says)."""
    for candidate in (os.environ.get("MCL_DATA_ROOT"), REPO_ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cifar-100-python" / "train").is_file():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = find_data_root()
    if root is None:
        message = "real CIFAR-100 not found: set MCL_DATA_ROOT or put it at ../shared/data"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has the data: a missing copy is a failure, not a skip
        pytest.skip(message)
    return root


def attached(method, num_peers: int, width: int, num_classes: int = 100):
    """``method`` attached to a described network of ``num_peers`` peers with ``width``-d features,
    for unit tests that feed it synthetic tensors (OKDSystem does this from a real PeerNetwork)."""
    from mcl_lightning.models import PeerSpec

    method.attach(PeerSpec(num_peers, (width,) * num_peers, num_classes, "shared_trunk", trunk_channels=16))
    return method


# A small finished CLI run, shared by the checkpoint, evaluation, curves and bad-input tests (which
# must not change it). Its test pass covers the whole test set, so evaluation can be compared to it.
FINISHED_RUN = [
    "peers=2", "backbone=resnet20", "method.nce_k=32", "method.projection_dim=16", "data.batch_size=32",
    "data.eval_batch_size=500", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2", "trainer.limit_test_batches=1.0", "trainer.enable_progress_bar=false",
]


# Tiny settings for a real CLI training run: one epoch of three batches, two batches of validation and test.
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "data.eval_batch_size=64",
]


def tiny_training_run(run_dir: Path, data_root: Path, *overrides: str, terms: tuple[str, ...] = ()):
    """``python -m mcl_lightning.train`` with TINY settings into ``run_dir``; asserts it finished and that
    every loss term in ``terms`` was logged and finite. Returns (results.json, metrics.csv rows, process)."""
    import csv
    import json

    proc = run_cli("mcl_lightning.train", f"data.root={data_root}", f"hydra.run.dir={run_dir}", *TINY, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    for term in terms:
        values = [float(r[f"train/loss/{term}"]) for r in rows if r.get(f"train/loss/{term}")]
        assert values and all(v == v and abs(v) != float("inf") for v in values), term  # logged, finite
    return results, rows, proc


def only_error_line(proc) -> str:
    """The one ``error:`` line of a refused CLI run (exit status 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 900, **kwargs):
    """``python -m <module> args...`` with captured text output."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def finished_run(data_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli("mcl_lightning.train", *FINISHED_RUN, f"data.root={data_root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def doc_files() -> list[Path]:
    """The pages whose tagged examples the tests run: README.md and every page of the docs site."""
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]


DOC_TAG = r"<!-- test: ([\w-]+) -->\s*```(\w+)\n(.*?)```"


def doc_blocks(tag: str, lang: str) -> list[str]:
    """The fenced ``lang`` blocks marked ``<!-- test: tag -->`` (README.md and docs/**/*.md), in order.

    A tag belongs to one page. The only repeat allowed is a mirror: a second page (the README) may carry
    exactly the same blocks under the same tag, so that the copies cannot drift apart."""
    import re

    found: dict[str, list[str]] = {}
    for path in doc_files():
        for name, block_lang, body in re.findall(DOC_TAG, path.read_text(), flags=re.S):
            if name == tag:
                page = str(path.relative_to(REPO_ROOT))
                assert block_lang == lang, f"{page}: <!-- test: {tag} --> marks a {block_lang} block, not {lang}"
                found.setdefault(page, []).append(body)
    assert found, f"no block marked <!-- test: {tag} --> in README.md or docs/"
    first, *others = found.values()
    assert all(blocks == first for blocks in others), (
        f"<!-- test: {tag} --> marks different blocks in {sorted(found)}: a tag belongs to one page (or exact mirrors)")
    return first


def doc_block(tag: str, lang: str) -> str:
    """The one fenced ``lang`` block marked ``<!-- test: tag -->`` (see ``doc_blocks``)."""
    blocks = doc_blocks(tag, lang)
    assert len(blocks) == 1, f"<!-- test: {tag} --> marks {len(blocks)} blocks on one page, expected one"
    return blocks[0]


def doc_commands(tag: str) -> list[tuple[str, list[str]]]:
    """The ``python -m <module> args`` lines of the bash block marked ``<!-- test: tag -->``, as
    (module, args): continuation lines joined, comments dropped."""
    import shlex

    commands = []
    for line in doc_block(tag, "bash").replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        assert words[:2] == ["python", "-m"], line
        commands.append((words[2], words[3:]))
    return commands


# 2 epochs of 8 steps, a step checkpoint every 2 steps (the last step of an epoch is left to the
# epoch's own checkpoint, after validation).
KILL_RUN = ["peers=2", "backbone=resnet20", "method.nce_k=32", "method.projection_dim=8", "data.batch_size=16",
            "trainer.max_epochs=2", "trainer.limit_train_batches=8", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2"]


def wait_for_checkpoint(proc, checkpoint: Path, step: int, timeout: float = 600) -> dict:
    """Wait until ``checkpoint`` (replaced atomically) holds global step >= ``step``; returns it."""
    import time

    import torch

    seen, deadline = None, time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        stamp = checkpoint.stat().st_mtime_ns if checkpoint.is_file() else None
        if stamp is not None and stamp != seen:
            seen = stamp
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if state["global_step"] >= step:
                return state
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step >= {step}: {proc.poll()} {proc.stderr.read()[-2000:] if proc.stderr else ''}")


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux /proc)."""
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for task in tasks.iterdir() for c in (task / "children").read_text().split()]


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").split("=", 1) for entry in raw if b"=" in entry)
