"""Shared fixtures: where the real data lives, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_data_root() -> Path | None:
    """MCL_DATA_ROOT, else ../shared/data beside the checkout (the CI layout, DEVELOPERS.md)."""
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


def meta_training_step(peers, method, batch: int = 8) -> dict:
    """One training step of ``method`` on ``peers`` (both already attached) on the meta device, CIFAR
    augmentation included: any ``.item()`` or data-dependent shape raises there, so a step that
    returns has no host synchronisation. Returns the loss terms (meta tensors, backward done)."""
    import copy

    import torch

    from mcl_lightning.data import CIFAR100_MEAN, CIFAR100_STD, normalize, random_crop_flip

    meta_peers, meta_method = copy.deepcopy(peers).to("meta"), method.to("meta")
    images = torch.empty(batch, 3, 32, 32, dtype=torch.uint8, device="meta")
    images = normalize(random_crop_flip(images), CIFAR100_MEAN, CIFAR100_STD)
    labels = torch.empty(batch, dtype=torch.long, device="meta")
    indices = torch.empty(batch, dtype=torch.long, device="meta")
    losses = meta_method(meta_peers(images), labels, indices)
    torch.stack(list(losses.values())).sum().backward()
    assert all(v.device.type == "meta" for v in losses.values())
    return losses


def fp32_and_bf16_losses(peers, method, check_bf16_output=None) -> tuple[dict, dict]:
    """A method's loss terms on one synthetic batch in float32 and under CPU bf16 autocast (no grad),
    after asserting that every bf16 term is a finite float32 and the totals agree within 1 %.
    ``check_bf16_output(output)`` sees the peers' bf16 output first."""
    import torch

    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad():
        fp32 = method(peers(x), labels, torch.arange(8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = peers(x)
            if check_bf16_output is not None:
                check_bf16_output(output)
            bf16 = method(output, labels, torch.arange(8))
    for name in fp32:
        assert bf16[name].dtype == torch.float32 and torch.isfinite(bf16[name]), name
    total32, total16 = sum(fp32.values()), sum(bf16.values())
    assert abs(total16 - total32) / total32 < 1e-2
    return fp32, bf16


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


def check_two_peer_run(results: dict, method: str, topology: str, ensemble: str | None = None) -> dict:
    """What every method's short 2-peer CLI run must report (results.json of ``tiny_training_run``):
    its method, peers, topology and ensemble, accuracies of each peer, their mean and the ensemble
    after training and on the test set. Returns the last checkpoint's state dict."""
    import torch

    assert (results["method"], results["peers"], results["topology"]) == (method, 2, topology)
    assert ensemble is None or results["ensemble"] == ensemble
    for part in ("final", "test"):
        assert set(results[part]) == {"peer0", "peer1", "peer_mean", "ensemble", "best_peer", "num_images"}
        assert 0.0 <= results[part]["ensemble"]["top1"] <= 1.0
    return torch.load(results["checkpoints"]["last"], map_location="cpu", weights_only=True)["state_dict"]


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


# Session fixtures that run training: under pytest-xdist (make test: --dist loadgroup) every test that
# uses one goes to the same worker, so each is built once rather than once per worker.
SHARED_RUNS = ("finished_run", "reencoded_root")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture in SHARED_RUNS:
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(fixture))
                break
