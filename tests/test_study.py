"""The study planner's arithmetic (mcl_lightning.tools.study) and reproduce's option handling, without training."""

from __future__ import annotations

import pytest

from mcl_lightning.tools import reproduce
from mcl_lightning.core.errors import ConfigError
from mcl_lightning.tools.study import RunCost, fill_costs, limited, gaps, makespan, order_longest_first, plan_epochs, probe_slots


def test_makespan_is_the_greedy_list_schedule_in_order():
    assert makespan([5, 3, 3, 3], 2) == 8  # 5 | 3, 3 -> 6 | then 3 on the worker free at 5 -> 8
    assert makespan([5, 3, 3, 3], 4) == 5
    assert makespan([2, 2, 2], 1) == 6


def test_probe_slots_take_the_recipes_in_turn():
    assert probe_slots(["a", "b", "c"], 1) == ["a"]
    assert probe_slots(["a", "b", "c"], 4) == ["a", "b", "c", "a"]


def test_a_run_costs_startup_epochs_and_a_test_pass():
    cost = RunCost("a", images_per_s=1000.0, train_images_per_epoch=50_000, eval_images=9_000, startup_s=10.0)
    assert cost.epoch_s == pytest.approx(50 + 3)  # evaluation at three times the training rate
    assert cost.seconds(10) == pytest.approx(10 + 10 * 53 + 3)


def test_plan_fits_the_most_epochs_in_the_budget_longest_runs_first():
    slow = RunCost("slow", 1000.0, 10_000, 0, 0.0)   # 10 s an epoch
    fast = RunCost("fast", 10_000.0, 10_000, 0, 0.0)  # 1 s an epoch
    costs = {"fast": fast, "slow": slow}
    assert order_longest_first(costs) == ["slow", "fast"]
    # 2 seeds each on 2 workers, longest first: slow, slow in parallel, then fast, fast -> 11 E seconds
    epochs, span = plan_epochs(costs, seeds=2, workers=2, budget_s=110.0)
    assert (epochs, span) == (10, pytest.approx(110.0))
    assert plan_epochs(costs, seeds=2, workers=2, budget_s=110.0, max_epochs=4)[0] == 4
    assert plan_epochs(costs, seeds=2, workers=2, budget_s=1.0)[0] == 1  # at least one epoch, even past the budget
    assert plan_epochs(costs, seeds=2, workers=4, budget_s=110.0)[0] == 11  # all four at once


def test_unmeasured_recipes_scale_by_their_ratio_at_the_full_level():
    reference = {"a": 100.0, "b": 50.0, "c": 200.0}  # speeds where all three ran together
    filled = fill_costs({"a": [300.0, 260.0]}, reference, ["a", "b", "c"])
    assert filled == {"a": 280.0, "b": 140.0, "c": 560.0}
    with pytest.raises(ValueError):
        fill_costs({}, reference, ["a"])


def _results(peers: int, top1: float, published_error: float | None) -> dict:
    reference = {"top1_error": {"peer": published_error}} if published_error is not None else None
    return {"peers": peers, "test": {f"peer{peers - 1}": {"top1": top1}}, "reference": reference}


def test_gaps_are_the_subject_minus_each_other_recipe_mean_over_seeds():
    runs = {"mcl": [_results(4, 0.70, 24.52), _results(4, 0.72, 24.52)],
            "dml": [_results(4, 0.69, 24.92), _results(4, 0.69, 24.92)],
            "base": [_results(1, 0.65, 28.91)]}
    rows = {r["gap"]: r for r in gaps(runs, "mcl")}
    assert set(rows) == {"mcl - dml", "mcl - base"}
    assert rows["mcl - dml"]["ours"] == pytest.approx(2.0) and rows["mcl - dml"]["published"] == pytest.approx(0.40)
    assert rows["mcl - base"]["ours"] == pytest.approx(6.0) and rows["mcl - base"]["published"] == pytest.approx(4.39)
    assert rows["mcl - base"]["seeds"] == {"mcl": 2, "base": 1}
    assert gaps({"mcl": [], "dml": runs["dml"]}, "mcl")[0]["ours"] is None  # no finished run: no number


def test_images_per_pass_follow_lightnings_limits():
    assert limited(50_000, 64, 1.0) == 50_000
    assert limited(50_000, 64, 2) == 128  # a count of batches
    assert limited(50_000, 64, 1) == 64
    assert limited(50_000, 100, 0.5) == 25_000  # a fraction of the batches
    assert limited(10_000, 256, 0) == 0


def test_overrides_the_user_sets_replace_the_fast_path_and_reserved_keys_are_refused():
    fast = ["trainer=gpu", "data.device_resident=true"]
    assert reproduce.merged(fast, ["trainer=cpu", "data.root=/d"]) == ["data.device_resident=true", "trainer=cpu",
                                                                       "data.root=/d"]
    for bad in (["seed=3"], ["experiment=cifar100/dml_resnet32"], ["hydra.sweep.dir=x"]):
        with pytest.raises(ConfigError, match="--"):
            reproduce.parse_args(bad)
    with pytest.raises(ConfigError, match="largest --concurrency"):
        reproduce.parse_args(["--concurrency", "1,2"])
    with pytest.raises(ConfigError, match="probe-steps"):
        reproduce.parse_args(["--probe-steps", "3"])
    args = reproduce.parse_args(["--seeds", "0,1,2", "--concurrency", "6,1,4", "data.root=/d"])
    assert args.seeds == [0, 1, 2] and args.concurrency == [1, 4, 6] and args.overrides == ["data.root=/d"]
    assert args.experiments == ["cifar100/mcl_okd_resnet32", "cifar100/dml_resnet32", "cifar100/baseline_resnet32"]


def test_a_missing_joblib_is_one_clear_error_before_any_work(monkeypatch, tmp_path, capsys):
    import importlib.util

    from mcl_lightning.tools import gpu_evidence
    from mcl_lightning.tools import multirun

    assert multirun.missing_launcher_packages() == []  # a dependency of the package: installed here
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "joblib" else real_find_spec(name, *a, **k))
    assert multirun.missing_launcher_packages() == ["joblib"]
    with pytest.raises(ConfigError, match="pip install joblib$"):
        reproduce.parse_args(["data.root=/d"])
    # gpu_evidence says so before its benchmark spends the first part of a GPU lease
    out = tmp_path / "evidence"
    with pytest.raises(SystemExit) as exit_:
        gpu_evidence.main(["--out", str(out), f"data.root={tmp_path}"])
    assert exit_.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().endswith("pip install joblib")
