"""The benchmark survives what a Trainer does to the modules it shares between rows, and reports a row
that breaks instead of dropping its table.

On a GPU, Lightning's strategy teardown calls ``.cpu()`` on the LightningModule after ``trainer.fit``,
and so moves the table's cached network, which the next row (the closing floor run) reuses, off the
device. On the CPU that call moves nothing, so these tests make the teardown's move visible by sending
the module to the ``meta`` device instead: the same mechanism, a device the next row cannot use."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mcl_lightning.tools import bench
from mcl_lightning.tools.bench import measure
from mcl_lightning.tools.bench.runs import Bench
from mcl_lightning.tools.bench.settings import row_specs
from mcl_lightning.data import CIFARDataModule
from mcl_lightning.models import PeerLayout
from mcl_lightning.system import OKDSystem

TINY = dict(steps=1, warmup=1, repeats=1, data_batches=1, data_k=(), memory_k=0)


@pytest.fixture
def teardown_moves_the_model(monkeypatch):
    """The strategy's teardown (``lightning_module.cpu()``) moves the model off the table's device."""
    monkeypatch.setattr(OKDSystem, "cpu", lambda self: self.to_empty(device="meta"), raising=False)


def tiny_table(data_root, **changes):
    settings = replace(bench.preset("tiny", "cpu")[0], **{**TINY, **changes})
    dm = CIFARDataModule(root=str(data_root), batch_size=settings.batch_size, download=False, check_integrity=False)
    dm.prepare_data()
    dm.setup("fit")
    return settings, dm


def test_a_row_after_a_lightning_row_finds_its_network_on_the_device(data_root, teardown_moves_the_model):
    settings, dm = tiny_table(data_root, rows=("independent",), plain=())
    runner = Bench(settings, dm)
    before = {k: v.clone() for k, v in runner.network(PeerLayout()).state_dict().items()}
    floor, lightning = row_specs(settings)
    runner.run_lightning(lightning)
    peers = runner.network(PeerLayout())  # what the closing floor run trains
    assert {p.device.type for p in peers.parameters()} == {"cpu"}
    assert {b.device.type for b in peers.buffers()} == {"cpu"}
    after = peers.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same starting weights as every row
    runner.run_plain(floor)


def test_a_table_runs_whole_after_its_lightning_rows(data_root, teardown_moves_the_model):
    settings, dm = tiny_table(data_root, rows=("independent", "mcl_okd@64"), plain=())
    result = measure.run_table(settings, dm, deadline=float("inf"), log=lambda _: None)
    assert "failed" not in result, result.get("failed")
    assert [r["name"] for r in result["rows"]] == ["floor (plain CE loop)", "independent", "mcl_okd K=64"]
    assert all(r["ratio_to_floor"] > 0 for r in result["rows"])


def test_a_failing_row_is_reported_with_its_error_and_a_nonzero_exit(data_root, tmp_path, monkeypatch, capsys):
    broken = Bench.run_lightning

    def run_lightning(self, row, *args, **kwargs):
        if row.method == "dml":
            raise RuntimeError("Expected all tensors to be on the same device")
        return broken(self, row, *args, **kwargs)

    monkeypatch.setattr(Bench, "run_lightning", run_lightning)
    path = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--preset", "tiny", "--device", "cpu", "--data-root", str(data_root), "--json", str(path),
                    "--rows", "independent;dml", "--plain", "", "--steps", "1", "--data-k", "", "--memory-k", "0"])
    assert exit_.value.code == 1
    assert "1 table(s) or row(s) failed" in capsys.readouterr().err
    results = json.loads(path.read_text())
    (table,) = results["tables"]
    assert [r["name"] for r in table["rows"]] == ["floor (plain CE loop)", "independent"]  # the others kept
    (failed,) = table["failed"]
    assert failed["name"] == "dml" and "same device" in failed["error"]
    assert results["failures"] == ["tiny / dml: RuntimeError: Expected all tensors to be on the same device"]
