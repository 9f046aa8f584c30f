"""Every entry point on a re-encoded CIFAR-100 copy (md5s differ from the official files, as the copy a
GPU machine gets), with ``data.check_integrity=false``; a wrong data folder is one line and exit status 2
from each. One short run of each entry point: ``make test-oldest`` runs this file on the oldest
supported versions."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FINISHED_RUN, run_cli
from mcl_lightning import evaluate, export
from mcl_lightning.tools import bench, gpu_evidence, report, reproduce

TINY_BENCH = ["--preset", "tiny", "--device", "cpu", "--rows", "mcl_okd@64", "--plain", "", "--data-k", "",
              "--memory-k", "0"]


def _reencode(source: Path, target: Path) -> None:
    """The shared tools' cifar-pack round trip (JPEG, what a GPU machine gets) where it exists, else the
    same pickles written again with another protocol: either way other bytes, other md5s."""
    pack = source.parent / "tools" / "cifar-pack"
    if pack.is_file():
        packed = target.parent / "packed"
        subprocess.run([sys.executable, str(pack), "pack", str(source), str(packed)], check=True, capture_output=True)
        subprocess.run([sys.executable, str(pack), "unpack", str(packed), str(target)], check=True, capture_output=True)
        return
    (target / "cifar-100-python").mkdir(parents=True)
    for name in ("train", "test", "meta"):
        with open(source / "cifar-100-python" / name, "rb") as file:
            content = pickle.load(file, encoding="latin1")
        with open(target / "cifar-100-python" / name, "wb") as file:
            pickle.dump(content, file, protocol=2)


@pytest.fixture(scope="session")
def reencoded_root(data_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reencoded") / "data"
    _reencode(data_root, root)
    import hashlib

    official = hashlib.md5((data_root / "cifar-100-python" / "test").read_bytes()).hexdigest()
    assert hashlib.md5((root / "cifar-100-python" / "test").read_bytes()).hexdigest() != official
    return root


def test_a_reencoded_copy_trains_evaluates_exports_and_reports(reencoded_root, tmp_path):
    run_dir = tmp_path / "run"
    data = [f"data.root={reencoded_root}", "data.check_integrity=false"]
    proc = run_cli("mcl_lightning.train", *FINISHED_RUN[:6], "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
                   *data, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["config"]["data"]["check_integrity"] is False
    assert results["throughput"]["train_dataset_size"] == 50_000
    # the other entry points in this process (their own CLI runs are in test_evaluate.py and test_report.py)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    evaluate.main([str(checkpoint), *data, "data.eval_batch_size=1000", "--accelerator", "cpu",
                   "--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["test_images"] == 10_000
    export.main([str(checkpoint), "--out", str(tmp_path / "peer.pt")])
    assert (tmp_path / "peer.pt").is_file()
    report.main([str(run_dir), "--out", str(tmp_path / "report")])
    assert "mcl_okd" in (tmp_path / "report.md").read_text()


def test_a_reencoded_copy_benchmarks_and_is_refused_without_check_integrity_false(reencoded_root, tmp_path, capsys):
    path = tmp_path / "bench.json"
    proc = run_cli("mcl_lightning.bench", *TINY_BENCH, "--json", str(path), f"data.root={reencoded_root}",
                   "data.check_integrity=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(path.read_text())["tables"][0]["rows"]
    with pytest.raises(SystemExit) as stop:  # the same copy, checked: one line naming the fix
        bench.main([*TINY_BENCH, f"data.root={reencoded_root}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "data.check_integrity=false" in err and len(err.strip().splitlines()) == 1


def _one_line_exit_2(capsys, call, *needles: str, lines: int = 1) -> None:
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    assert len(err.splitlines()) <= lines and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_a_wrong_data_folder_is_one_line_and_exit_2_from_each_entry_point(finished_run, tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_exit_2(capsys, lambda: bench.main([*TINY_BENCH, f"data.root={nowhere}"]), str(nowhere))
    # a folder without the files: the message lists where each file goes (one message, several lines)
    _one_line_exit_2(capsys, lambda: bench.main([*TINY_BENCH, f"data.root={empty}", "data.download=false"]),
                     str(empty), "data.root=", lines=8)
    _one_line_exit_2(capsys, lambda: bench.main([*TINY_BENCH, "data.no_such_option=1"]), "data.<option>=<value>")
    checkpoint = str(finished_run / "checkpoints" / "last.ckpt")
    _one_line_exit_2(capsys, lambda: evaluate.main([checkpoint, f"data.root={nowhere}"]), str(nowhere))
    _one_line_exit_2(capsys, lambda: reproduce.main([f"data.root={nowhere}", "--out", str(tmp_path / "study")]),
                     str(nowhere))
    assert not (tmp_path / "study").exists()  # nothing written before the check
    _one_line_exit_2(capsys, lambda: reproduce.main(["--experiments", "cifar100/no_such,cifar100/dml_resnet32"]),
                     "no_such")
    _one_line_exit_2(capsys, lambda: gpu_evidence.main([f"data.root={nowhere}", "--out", str(tmp_path / "ev")]),
                     str(nowhere))
