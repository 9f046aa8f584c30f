"""logger= (conf/logger/): W&B offline and MLflow beside the CSV, every CSV metric under its own name."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import doc_commands, run_cli
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.runtime.tracking import check_loggers

TINY = ["peers=2", "backbone=resnet8", "method.nce_k=32", "method.projection_dim=16", "data.batch_size=32",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def csv_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} as Lightning's CSVLogger wrote them."""
    series: dict[str, list[tuple[int, float]]] = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB log: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.fixture(scope="module")
def tracked_run(data_root, tmp_path_factory) -> Path:
    pytest.importorskip("wandb", reason='logger=wandb needs pip install "mcl-lightning[wandb]"')
    pytest.importorskip("mlflow", reason='logger=mlflow needs pip install "mcl-lightning[mlflow]"')
    where = tmp_path_factory.mktemp("tracked")
    ((module, args),) = doc_commands("loggers")  # docs/guide/trackers.md's command, with tiny settings
    assert args == ["logger=[default,mlflow,wandb]", "logger.offline=true"]
    proc = run_cli(module, *args, *TINY, f"data.root={data_root}", f"hydra.run.dir={where / 'run'}", cwd=where)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return where


def test_mlflow_store_holds_the_csv_metrics_and_the_run_files(tracked_run):
    from mlflow.tracking import MlflowClient

    expected = csv_series(tracked_run / "run" / "csv" / "metrics.csv")
    assert "train/loss/contrastive" in expected and "test/peer1/top1" in expected and "lr-SGD/peers" in expected
    client = MlflowClient(f"sqlite:///{tracked_run / 'mlruns' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "mcl-lightning"]
    (run,) = client.search_runs([experiment.experiment_id])
    for name, values in expected.items():
        logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(logged) == sorted(values), name
    assert run.data.params["config/method/beta"] == "0.025" and run.data.params["config/seed"] == "0"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"results.json", "curves.png"}


def test_wandb_offline_run_holds_the_csv_metrics_and_the_config(tracked_run):
    (run_dir,) = (tracked_run / "run" / "wandb").glob("offline-run-*")
    history: dict[str, list[float]] = {}
    config: dict = {}
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    for name, values in csv_series(tracked_run / "run" / "csv" / "metrics.csv").items():
        assert history.get(name) == [v for _, v in values], name
    assert config["config"]["method"]["beta"] == 0.025 and config["config"]["peers"] == 2
    saved = json.loads((run_dir / "files" / "results.json").read_text())
    assert saved == json.loads((tracked_run / "run" / "results.json").read_text())
    assert (run_dir / "files" / "curves.png").is_file()


@pytest.mark.slow  # the message itself: test_logger_entries_are_the_targets_only
def test_a_tracker_that_is_not_installed_names_its_extra(tmp_path, data_root):
    code = ("import sys; sys.modules['wandb'] = None\n"  # as if the extra were not installed
            "from mcl_lightning.train import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "logger=wandb", f"data.root={data_root}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: logger=wandb needs the wandb package") and 'mcl-lightning[wandb]' in line
    assert not (tmp_path / "run").exists()


def test_logger_entries_are_the_targets_only(monkeypatch):
    check_loggers(None)
    check_loggers(OmegaConf.create({"offline": True}))  # a shared switch, not a logger
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"mcl-lightning\[mlflow\]"):
        check_loggers(OmegaConf.create({"mlflow": {"_target_": "lightning.pytorch.loggers.MLFlowLogger"}}))


@pytest.mark.slow
def test_logger_none_keeps_results_and_checkpoints(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_cli("mcl_lightning.train", *TINY, "logger=none", f"data.root={data_root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "csv").exists() and not (run_dir / "tensorboard").exists()
