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
