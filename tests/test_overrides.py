"""Typos answered (runtime/overrides.py): the option check passes every shipped config, names a mistyped
option's group options with the closest one, takes any Trainer argument without Hydra's `+`, names the
closest recipes, and names each job of a multirun that cannot start. The CLI's one line for each kind is
in test_bad_inputs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.runtime.overrides import (accept_trainer_args, check_group_options, check_jobs, expand,
                                             explain_composition, explain_sweep, recipes)

CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(overrides: list[str]):
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_the_perf_and_optim_options_pass_the_option_check():
    """(test_train.py and test_experiments.py check every other group option and every recipe as they compose them.)"""
    for group in ("perf", "optim"):
        for path in sorted((CONF / group).glob("*.yaml")):
            check_group_options(composed([f"{group}={path.stem}"]))


def test_recipes_are_every_experiment_file():
    files = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in (CONF / "experiment").rglob("*.yaml"))
    assert recipes() == files and "cifar100/mcl_okd_resnet32" in files


@pytest.mark.parametrize("override, fragments", [
    ("+method.nce=64", ["unknown option method.nce (MCLOKD has no option 'nce'); did you mean method.nce_k?",
                        "method's options: projection_dim, nce_k, tau"]),
    ("+backbone.branchpoint=2", ["did you mean backbone.branch_point?", "name, branch_point, library, pretrained"]),
    ("+data.batchsize=3", ["CIFARDataModule has no option 'batchsize'", "did you mean data.batch_size?"]),
    ("+perf.fuse=true", ["did you mean perf.fuse_peers?"]),
    ("+trainer.max_epoch=3", ["Trainer has no option 'max_epoch'", "did you mean trainer.max_epochs?"]),
    ("+optim.lrr=0.1", ["the optim group with SGD has no option 'lrr'", "did you mean optim.lr?"]),
    ("optim=adamw +optim.momentum=0.9", ["the optim group with AdamW has no option 'momentum'",
                                          "optim's options: lr, weight_decay, betas, scheduler"]),
])
def test_an_unknown_group_option_names_the_groups_options(override, fragments):
    with pytest.raises(ConfigError) as caught:
        check_group_options(composed(override.split()))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_hydras_could_not_override_is_answered_with_the_groups_options():
    with pytest.raises(Exception) as hydra_error:
        composed(["method=dml", "method.alpah=2"])
    found = explain_composition(hydra_error.value, ["method=dml", "method.alpah=2"], composed)
    assert "unknown option method.alpah (DML has no option 'alpah'); did you mean method.alpha?" in str(found)


def test_any_trainer_argument_is_accepted_without_plus():
    args = ["trainer.check_val_every_n_epoch=10", "trainer.max_epochs=3", "trainer.strategy.timeout_s=5",
            "trainer.max_epoch=3", "trainer=cpu", "method.gamma=2", "-m"]
    assert accept_trainer_args(args) == ["++trainer.check_val_every_n_epoch=10", *args[1:]]
    cfg = composed(accept_trainer_args(["trainer.gradient_clip_val=1.5", "trainer.check_val_every_n_epoch=10"]))
    assert (cfg.trainer.gradient_clip_val, cfg.trainer.check_val_every_n_epoch, cfg.trainer.max_epochs) == (1.5, 10, 300)


def test_a_multirun_names_each_job_that_cannot_start():
    jobs = expand(["method=dml,one,independent", "method.rampup_epochs=80", "peers=2"])
    assert jobs[1] == ["method=one", "method.rampup_epochs=80", "peers=2"]
    with pytest.raises(ConfigError) as caught:
        check_jobs(jobs, composed)
    message = str(caught.value)
    assert message.startswith("2 of 3 jobs of this multirun cannot start, so none was run: job 0 (method=dml): "
                              "unknown option method.rampup_epochs (DML has no option 'rampup_epochs')")
    assert "job 2 (method=independent)" in message and "job 1" not in message
    check_jobs(expand(["method=one,okddip", "method.rampup_epochs=80"]), composed)  # every job takes it


def test_an_override_every_job_takes_gets_the_plus_plus_fix():
    """Hydra composes a sweep's base config (method=mcl_okd) before any job and refuses the override there."""
    arguments = ["method=one,okddip", "method.rampup_epochs=80"]
    with pytest.raises(Exception) as hydra_error:
        composed(["method.rampup_epochs=80"])
    found = explain_sweep(hydra_error.value, arguments, composed)
    assert "every job of this multirun takes method.rampup_epochs" in str(found)
    assert "write it as ++method.rampup_epochs=80" in str(found)
