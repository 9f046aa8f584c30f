"""Optuna search (hydra/sweeper=optuna, hparams_search=<method>): docs/guide/search.md's sweeps on the holdout,
the refusal to select on the test set, and the report of a sweep folder (one row per trial)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from conftest import doc_commands, run_cli
from mcl_lightning.runtime.results import objective

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='hydra/sweeper=optuna needs pip install "mcl-lightning[tune]"')

TINY = ["peers=2", "backbone=resnet8", "method.projection_dim=16", "data.batch_size=32", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false"]
METHODS = ["mcl_okd", "dml", "cl_ilr", "one", "okddip", "mutual_cl"]


def sweep_and_report(tmp_path: Path, line: int, *extra: str) -> tuple[list[dict], str]:
    """The search page's block: command ``line`` with tiny settings, then its report line on the folder."""
    commands = doc_commands("search")
    module, args = commands[line]
    sweep = tmp_path / "sweep"
    proc = run_cli(module, *args, *TINY, *extra, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    report_module, report_args = commands[-1]
    proc = run_cli(report_module, *[str(sweep) if a.startswith("multirun/") else a for a in report_args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return trials, proc.stdout


def test_three_optuna_trials_over_beta_on_the_holdout_and_their_report(tmp_path, data_root):
    trials, table = sweep_and_report(tmp_path, 1, "method.nce_k=32", f"data.root={data_root}")
    assert len(trials) == 3 and len({t["config"]["method"]["beta"] for t in trials}) == 3
    assert all(t["selection"] != "test-selected" and 0.005 <= t["config"]["method"]["beta"] <= 0.2 for t in trials)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3 and "3 trials" in table and "method.beta" in table
    best = max(range(3), key=lambda i: objective(trials[i]))  # the first of equal bests, as max() picks
    assert [("**best**" in row) for row in rows] == [i == best for i in range(3)]
    assert f"{100 * objective(trials[best]):.2f}" in rows[best]


def test_a_search_without_a_holdout_is_refused_in_one_line(tmp_path, data_root):
    module, args = doc_commands("search")[1]
    args = [a for a in args if not a.startswith("data.val_split")]
    proc = run_cli(module, *args, *TINY, f"data.root={data_root}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: an Optuna search selects on the validation set") and "data.val_split=5000" in line
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("method", METHODS)
def test_every_search_space_names_options_of_its_method(method):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={method}"], return_hydra_config=True)
        plain = compose("train", overrides=[f"method={method}"])
    assert cfg.hydra.sweeper.direction == "maximize" and "optuna" in cfg.hydra.sweeper._target_
    assert cfg.method == plain.method  # the search picks its method, defaults unchanged
    keys = list(cfg.hydra.sweeper.params)
    assert keys and all(k.startswith("method.") and k.split(".", 1)[1] in cfg.method for k in keys)


@pytest.mark.slow
def test_the_ready_mcl_okd_search_runs(tmp_path, data_root):
    trials, table = sweep_and_report(tmp_path, 0, "hydra.sweeper.n_trials=2", f"data.root={data_root}")
    assert len(trials) == 2 and all(t["method"] == "mcl_okd" for t in trials)
    assert "method.nce_k" in table and "method.tau" in table and table.count("**best**") == 1


@pytest.mark.slow
def test_a_diverging_trial_fails_and_the_search_goes_on(tmp_path, data_root):
    """A method whose loss turns NaN at step ``step``: the trial with step=1 fails (one line), step=99 finishes."""
    (tmp_path / "nan_method.py").write_text(
        "from mcl_lightning.methods import OKDMethod\n"
        "from mcl_lightning.methods.losses import cross_entropy_per_peer\n\n"
        "class ExplodeAt(OKDMethod):\n"
        "    def __init__(self, step: int = 1) -> None:\n"
        "        super().__init__()\n"
        "        self.step, self.calls = step, 0\n\n"
        "    def forward(self, output, labels, indices):\n"
        "        self.calls += 1\n"
        "        ce = cross_entropy_per_peer(output.logits, labels).sum()\n"
        "        return {'ce': ce, 'blowup': ce * (float('nan') if self.calls >= self.step else 0.0)}\n")
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "explode.yaml").write_text("_target_: nan_method.ExplodeAt\nstep: 1\n")
    sweep = tmp_path / "sweep"
    proc = run_cli("mcl_lightning.train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                   "hydra.sweeper.n_trials=4", "hydra.sweeper.max_failure_rate=1.0", "method.step=choice(1,99)",  # TPE seeded by seed=0: both values drawn
                   "method=explode", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "data.val_split=5000",
                   *[o for o in TINY if not o.startswith("method.")], f"data.root={data_root}",
                   f"hydra.sweep.dir={sweep}", env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(runs) == 4 and {r["config"]["method"]["step"] for r in runs} == {1, 99}
    assert all(r["status"] == ("failed" if r["config"]["method"]["step"] == 1 else "finished") for r in runs)
    assert "loss term 'blowup' became nan" in proc.stderr


@pytest.mark.slow
def test_a_search_without_the_tune_extra_names_it(tmp_path):
    code = ("import sys; sys.modules['hydra_plugins.hydra_optuna_sweeper'] = None\n"  # as if not installed
            "from mcl_lightning.train import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "-m", "hparams_search=mcl_okd", "data.val_split=5000",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert 'pip install "mcl-lightning[tune]"' in line and not (tmp_path / "sweep").exists()


def test_the_objective_is_the_deployed_peers_final_validation_top1():
    results = {"peers": 3, "final": {"peer0": {"top1": 0.9}, "peer2": {"top1": 0.25}}}
    assert objective(results) == 0.25
    assert math.isnan(objective({"peers": 3, "final": {}}))  # no validation (trainer.limit_val_batches=0)
