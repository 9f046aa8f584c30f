"""Long runs that lose nothing across resumes (issue 25): the loader's position with workers, the
run's history (CSV, TensorBoard, trackers), schedule changes on resume, short runs' summaries,
train.log, and a soak test of interruptions."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FINISHED_RUN, run_cli
from mcl_lightning.data.resumable import ResumableLoader, ResumableOrderSampler
from mcl_lightning.tools.curves import read_epoch_series
from mcl_lightning.runtime.history import ROWS_KEY, ResumableCSVLogger, restore_rows
from mcl_lightning.runtime.results import format_table
from mcl_lightning.runtime.validation import schedule_differences


class _Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> int:
        return index


def _loader(seed: int = 3) -> ResumableLoader:
    data = _Indices()
    return ResumableLoader(data, batch_size=4, sampler=ResumableOrderSampler(data, 1, 0, seed), num_workers=2,
                           persistent_workers=True)


def test_loader_state_counts_the_batches_training_consumed_not_what_workers_prefetched():
    loader = _loader()
    loader.sampler.set_epoch(2)
    full = [batch.tolist() for batch in loader]
    iterator = iter(loader)
    head = [next(iterator).tolist() for _ in range(3)]  # the workers have fetched several batches more
    state = loader.state_dict()
    assert state["yielded"] == 12 and state["epoch"] == 2
    resumed = _loader(seed=0)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert head + [batch.tolist() for batch in resumed] == full  # batch 4 next, nothing skipped
    assert resumed.state_dict()["yielded"] == 40



def test_an_iterator_made_before_the_next_epoch_is_set_trains_on_that_epochs_order():
    """Resuming from an epoch-end checkpoint, Lightning creates the iterator (the workers start) before
    it sets the next epoch."""
    loader = _loader()
    loader.load_state_dict({"seed": 3, "epoch": 0, "yielded": 8, "num_replicas": 1})
    iterator = iter(loader)
    loader.sampler.set_epoch(1)
    reference = _loader()
    reference.sampler.set_epoch(1)
    assert [batch.tolist() for batch in iterator] == [batch.tolist() for batch in reference]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["yielded"] == 40

# -- CLI runs interrupted at chosen points (tests/interrupted_train.py) --------------------------------
WRAPPER = Path(__file__).with_name("interrupted_train.py")
SMALL = ["peers=2", "backbone=resnet20", "method.nce_k=32", "method.projection_dim=8", "data.batch_size=16",
         "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def launch(run_dir: Path, *overrides: str, interrupt: str | None = None, order_log: Path | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The same pre-emptible command every time (``ckpt_path=last``), interrupted at ``interrupt``."""
    env = {**os.environ, "INTERRUPT": interrupt or "", "ORDER_LOG": str(order_log or "")}
    return subprocess.run([sys.executable, str(WRAPPER), *overrides, f"hydra.run.dir={run_dir}", "ckpt_path=last"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=cwd)


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "csv" / "metrics.csv").open(newline="")))


def row_kinds(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    """(kind, epoch, step) of each CSV row: lr (epoch start), train, val, test (epoch end)."""
    def kind(row: dict[str, str]) -> str:
        return next(k for k in ("lr-SGD/peers", "train/loss", "val/peer0/top1", "test/peer0/top1") if row.get(k)).split("/")[0]
    return [(kind(row), row["epoch"], row["step"]) for row in rows]


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_kill_right_after_an_epoch_end_loses_no_row_and_repeats_none(tmp_path, data_root):
    """Killed between epoch 0's checkpoint and its training row, then relaunched: every row once."""
    run_dir, common = tmp_path / "run", [*SMALL, f"data.root={data_root}"]
    assert launch(run_dir, *common, interrupt="epoch_end:0:0:KILL").returncode == -signal.SIGKILL
    proc = launch(run_dir, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(row_kinds(csv_rows(run_dir))) == sorted([
        ("lr-SGD", "", "0"), ("val", "0", "3"), ("train", "0", "3"),
        ("lr-SGD", "", "4"), ("val", "1", "7"), ("train", "1", "7"), ("test", "2", "8")])
    assert "Previous log files" not in proc.stderr
    assert tensorboard_steps(run_dir, "train/loss") == [3, 7]  # the same TensorBoard run, each epoch once
    assert tensorboard_steps(run_dir, "lr-SGD/peers") == [0, 4]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_epoch"] is not None and results["epochs_run"] == 2
    assert sorted(read_epoch_series(run_dir / "csv" / "metrics.csv")["train/loss"]) == [0, 1]  # curves.png's data


def test_the_csv_restarts_from_the_checkpoints_rows_or_from_the_file_for_an_older_checkpoint(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,step,a,b\n0,3,1.5,\n,4,,2.0\n")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    restore_rows([logger], {"state_dict": {}})  # written before checkpoints carried their rows: kept
    logger.log_metrics({"a": 3.0}, step=7)
    logger.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text() == "a,b,epoch,step\n1.5,,0,3\n,2.0,,4\n3.0,,,7\n"
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    restore_rows([logger], {ROWS_KEY: [{"a": 1.5, "epoch": 0, "step": 3}]})  # rows after the checkpoint dropped
    logger.log_metrics({"b": 2.5}, step=4)
    logger.save()
    assert (tmp_path / "csv" / "metrics.csv").read_text() == "a,b,epoch,step\n1.5,,0,3\n,2.5,,4\n"
    assert logger.rows() == [{"a": 1.5, "epoch": 0, "step": 3}, {"b": 2.5, "step": 4}]


# -- schedule changes on resume ------------------------------------------------------------------------
def test_a_schedule_change_on_resume_is_named_and_extending_a_step_schedule_is_allowed():
    cosine = {"hyper_parameters": {"lr": 0.05, "scheduler": "cosine", "milestones": [150, 200]}, "max_epochs": 2}
    same = {"lr": 0.05, "scheduler": "cosine", "milestones": [150, 200], "max_epochs": 2}
    assert schedule_differences(cosine, same) == []
    (line,) = schedule_differences(cosine, {**same, "max_epochs": 3})
    assert line.startswith("trainer.max_epochs: checkpoint 2, now 3") and "trainer.max_epochs=2" in line
    assert schedule_differences(cosine, {**same, "lr": 0.1}) == ["optim.lr: checkpoint 0.05, now 0.1"]
    assert schedule_differences(cosine, {**same, "scheduler": "multistep"})[0].startswith("optim.scheduler")
    multistep = {"hyper_parameters": {**cosine["hyper_parameters"], "scheduler": "multistep"}, "max_epochs": 2}
    assert schedule_differences(multistep, {**same, "scheduler": "multistep", "max_epochs": 400}) == []  # extends
    warmup = {"hyper_parameters": {"scheduler": "warmup_cosine", "warmup_epochs": 1}, "max_epochs": 4}
    (line,) = schedule_differences(warmup, {"scheduler": "warmup_cosine", "warmup_epochs": 1, "max_epochs": 6})
    assert line.startswith("trainer.max_epochs: checkpoint 4, now 6 (optim.scheduler=warmup_cosine")
    assert schedule_differences(warmup, {"scheduler": "warmup_cosine", "warmup_epochs": 2, "max_epochs": 4})


def test_the_config_and_the_system_name_the_schedule_alike():
    """conf/optim hands OKDSystem a partial, not a name: the checkpoint and the resume check must still
    both say 'cosine' (else a resume that bends the cosine goes through), and a user's own callable is
    named by its qualified name on both sides."""
    from hydra.utils import instantiate

    from mcl_lightning.runtime.build import schedule_options
    from mcl_lightning.runtime.optim import optim_options, schedule_name, schedule_record
    from test_train import _compose

    for scheduler in ("cosine", "warmup_cosine", "multistep", "constant"):
        cfg = _compose([f"optim.scheduler={scheduler}", "optim.warmup_epochs=1", "trainer.max_epochs=3"])
        assert schedule_options(cfg)["scheduler"] == scheduler
        assert schedule_name(optim_options(cfg.optim)["scheduler"]) == scheduler
    custom = instantiate({"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 3})
    assert schedule_name(custom) == "torch.optim.lr_scheduler.StepLR"
    # a user's own schedule is kept apart from `scheduler` (which a reload passes back to OKDSystem) and a
    # switch between it and a shipped one is still named on resume
    assert schedule_record(custom) == {"scheduler_callable": "torch.optim.lr_scheduler.StepLR"}
    cosine = {"hyper_parameters": schedule_record("cosine"), "max_epochs": 3}
    (line,) = schedule_differences(cosine, {**schedule_record(custom), "max_epochs": 3})
    assert line == "optim.scheduler: checkpoint cosine, now torch.optim.lr_scheduler.StepLR"


def test_extending_a_finished_cosine_run_is_refused_in_one_line(finished_run, data_root):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    proc = run_cli("mcl_lightning.train", *FINISHED_RUN, "trainer.max_epochs=3", f"data.root={data_root}",
                   f"hydra.run.dir={finished_run}", "ckpt_path=last")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "trainer.max_epochs: checkpoint 2, now 3" in line and "optim.scheduler=cosine" in line
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before  # nothing was changed


# -- short runs ----------------------------------------------------------------------------------------
def test_the_table_of_a_run_without_validation_holds_its_test_results():
    test = {"peer0": {"top1": 0.5, "top5": 0.75}, "peer_mean": {"top1": 0.5, "top5": 0.75}}
    table = format_table({"final": {}, "best": {}, "test": test, "method": "dml"})
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["peer0", "peer_mean"]
    assert "50.00" in table.splitlines()[2]


def test_a_run_stopped_by_max_steps_summarises_and_its_train_log_holds_what_it_printed(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_cli("mcl_lightning.train", *SMALL, "trainer.max_steps=3", "trainer.enable_progress_bar=true",
                   f"data.root={data_root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["final"] == {} and results["test"]["peer0"]["top1"] >= 0
    peer0 = next(line for line in proc.stdout.splitlines() if line.startswith("peer0"))
    assert f"{100 * results['test']['peer0']['top1']:.2f}" in peer0
    assert "could not find the monitored key" not in proc.stderr
    assert "no validation has run yet, so no best checkpoint" in proc.stderr
    log = (run_dir / "train.log").read_text()
    for line in ["run directory: " + str(run_dir), "starting a new run", peer0, f"results: {run_dir / 'results.json'}",
                 "no validation has run yet", "`Trainer.fit` stopped: `max_steps=3` reached."]:
        assert line in log, line
    assert "\r" not in log and "it/s" not in log  # the progress bar stays on the console
    assert "it/s" in proc.stdout + proc.stderr



def test_an_optuna_trial_without_a_score_raises_its_reason_and_other_runs_return_nan():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='needs pip install "mcl-lightning[tune]"')
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mcl_lightning.core.errors import NoScoreError
    from mcl_lightning.train import search_score

    unscored = {"peers": 2, "final": {}}
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        search = compose("train", overrides=["hparams_search=mcl_okd", "trainer.max_steps=3"], return_hydra_config=True)
        single = compose("train", overrides=["trainer.max_steps=3"], return_hydra_config=True)
    try:
        search.hydra.mode = RunMode.MULTIRUN
        HydraConfig.instance().set_config(search)
        with pytest.raises(NoScoreError, match=r"before its first validation \(trainer.max_steps=3\)"):
            search_score(search, unscored)
        assert search_score(search, {"peers": 2, "final": {"peer1": {"top1": 0.25}}}) == 0.25
        single.hydra.mode = RunMode.RUN
        HydraConfig.instance().set_config(single)
        assert search_score(single, unscored) != search_score(single, unscored)  # NaN: nobody reads it
    finally:
        HydraConfig.instance().cfg = None

@pytest.mark.slow
def test_an_optuna_trial_that_never_validated_fails_with_its_reason_and_the_search_goes_on(tmp_path, data_root):
    """hparams_search with trainer.max_steps=3 inside the first epoch: no score (the issue's reproduction)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='needs pip install "mcl-lightning[tune]"')
    sweep = tmp_path / "sweep"
    small = [o for o in SMALL if not o.startswith(("trainer.max_epochs", "method."))]
    proc = run_cli("mcl_lightning.train", "-m", "hparams_search=mcl_okd", "data.val_split=5000", "hydra.sweeper.n_trials=4",
                   "trainer.max_steps=choice(3,-1)", "trainer.max_epochs=1", "method.projection_dim=8", *small,
                   f"data.root={data_root}", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    stopped = [n for n, r in trials.items() if r["config"]["trainer"]["max_steps"] == 3]
    assert len(trials) == 4 and stopped and len(stopped) < 4
    reason = "no validation score: the run stopped before its first validation (trainer.max_steps=3)"
    assert f"Failed experiment: {reason}" in proc.stdout
    for name in stopped:
        assert f"error: {reason}" in (sweep / name / "train.log").read_text()


# -- bit-exact resumes with loader workers, and the soak test ---------------------------------------------
def order_by_step(order_log: Path) -> dict[int, str]:
    """The dataset indices each optimiser step trained on (a redone step: its last record)."""
    steps: dict[int, str] = {}
    for line in order_log.read_text().splitlines():
        step, indices = line.split(" ", 1)
        steps[int(step)] = indices
    return steps


def assert_same_run(straight: Path, resumed: Path, orders: tuple[Path, Path]) -> None:
    """Weights, banks, optimiser state, data order, metrics.csv rows and results.json, bit for bit."""
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for run in (straight, resumed))
    assert a["global_step"] == b["global_step"] and a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # weights, heads and memory banks
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["val_history"] == b["val_history"]
    assert order_by_step(orders[0]) == order_by_step(orders[1])
    assert (straight / "csv" / "metrics.csv").read_text() == (resumed / "csv" / "metrics.csv").read_text()
    ra, rb = (json.loads((run / "results.json").read_text()) for run in (straight, resumed))
    for key in ("status", "epochs_run", "final", "best", "best_epoch", "max_over_epochs", "test"):
        assert ra[key] == rb[key], key
    assert Path(ra["checkpoints"]["best"]).name == Path(rb["checkpoints"]["best"]).name


@pytest.mark.slow
def test_a_killed_imagenet_folder_run_with_workers_resumes_bit_for_bit(tmp_path, data_root):
    common = ["data=imagenet", "backbone=resnet20", "peers=2", f"data.root={data_root / 'imagenette-mini'}",
              "data.image_size=64", "data.resize_size=73", "data.batch_size=16", "data.eval_batch_size=50",
              "data.num_workers=2", "method.nce_k=64", "trainer.max_epochs=1", "trainer.limit_train_batches=6",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
              "checkpoint.every_n_steps=2"]
    orders = (tmp_path / "straight.order", tmp_path / "resumed.order")
    proc = launch(tmp_path / "straight", *common, order_log=orders[0])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert launch(tmp_path / "resumed", *common, interrupt="batch:0:2:KILL", order_log=orders[1]).returncode == -signal.SIGKILL
    proc = launch(tmp_path / "resumed", *common, order_log=orders[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", orders)


# (point, epoch, n, signal): each launch of the same command is interrupted once, then one finishes
SOAK = [("batch", 0, 4, "KILL"),        # mid-epoch, after the step-4 checkpoint
        ("validation", 0, 1, "KILL"),   # during epoch 0's validation
        ("epoch_end", 0, 0, "KILL"),    # right after epoch 0's checkpoint, before its training row
        ("batch", 1, 2, "TERM"),        # SIGTERM mid-epoch: the next step's checkpoint, exit 143
        ("write", 1, 2, "KILL"),        # while a checkpoint of epoch 1 is half written
        ("validation", 1, 0, "TERM"),   # SIGTERM during validation: the epoch finishes first
        ("epoch_end", 2, 0, "KILL")]    # after the last epoch's checkpoint, before the test


@pytest.mark.slow
def test_soak_a_run_interrupted_seven_times_ends_as_the_uninterrupted_one(tmp_path, data_root):
    common = [*SMALL, "trainer.max_epochs=3", "trainer.limit_train_batches=8", "trainer.limit_val_batches=2",
              "data.num_workers=2", "checkpoint.every_n_steps=2", f"data.root={data_root}"]
    orders = (tmp_path / "straight.order", tmp_path / "soaked.order")
    proc = launch(tmp_path / "straight", *common, order_log=orders[0])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for point, epoch, n, name in SOAK:
        proc = launch(tmp_path / "soaked", *common, interrupt=f"{point}:{epoch}:{n}:{name}", order_log=orders[1])
        expected = -signal.SIGKILL if name == "KILL" else 143
        assert proc.returncode == expected, (point, epoch, n, name, proc.stderr[-3000:])
        if name == "TERM":
            assert "Traceback" not in proc.stderr and "ckpt_path=last" in proc.stderr
    proc = launch(tmp_path / "soaked", *common, order_log=orders[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(tmp_path / "straight", tmp_path / "soaked", orders)
    log = (tmp_path / "soaked" / "train.log").read_text()
    assert log.count("resuming from:") == len(SOAK) and "stopped by SIGTERM" in log


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_and_wandb_runs(tmp_path, data_root):
    pytest.importorskip("wandb", reason='logger=wandb needs pip install "mcl-lightning[wandb]"')
    mlflow = pytest.importorskip("mlflow", reason='logger=mlflow needs pip install "mcl-lightning[mlflow]"')
    run_dir = tmp_path / "run"
    common = [*SMALL, "logger=[default,mlflow,wandb]", "logger.offline=true", f"data.root={data_root}"]
    assert launch(run_dir, *common, interrupt="epoch_end:0:0:KILL", cwd=tmp_path).returncode == -signal.SIGKILL
    proc = launch(run_dir, *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/peer0/top1")] == [3, 7]
    ids = {p.name.split("-")[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1  # two launches, one run
