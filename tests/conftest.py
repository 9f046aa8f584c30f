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
