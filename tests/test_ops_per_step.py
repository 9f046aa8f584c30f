"""Issue 24's CPU target: an MCL-OKD ResNet-32 x4 training step in the study's configuration issues at
most 1,200 aten ops (benchmarks/ops_per_step.py, the command docs/benchmarks.md records figures with).

The count does not depend on the batch size (no op does per sample), so a small batch keeps it quick.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ops_per_step():
    spec = importlib.util.spec_from_file_location("ops_per_step", REPO_ROOT / "benchmarks" / "ops_per_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mcl_okd_resnet32_x4_step_in_the_study_configuration_is_at_most_1200_ops(data_root):
    ops = _ops_per_step()
    overrides = [*ops.study_overrides(), f"data.root={data_root}", "data.check_integrity=false", "data.batch_size=16"]
    assert "perf.fuse_peers=auto" in overrides  # the study fuses identical peers
    row = ops.count_ops("cifar100/mcl_okd_resnet32", overrides, warmup=2, steps=2)
    assert row["ops"] <= 1200, row["ops_by_name"]
    assert row["aten_events"] >= row["ops"] > 300  # it counted a whole step (a ResNet-32 trunk alone is ~400)
