"""The checks that run before any work, in-process: trainer numbers, a file in the run directory's way,
and Lightning's refusals turned into one line with a hint that fits."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import InstantiationException
from lightning.fabric.utilities.exceptions import MisconfigurationException

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.runtime.validation import check_config, check_run_dir, user_error

from conftest import find_data_root


def composed(*overrides: str):
    root = find_data_root()
    if root is None:
        pytest.skip("real data not found: set MCL_DATA_ROOT or put it at ../shared/data")
    with initialize_config_module("mcl_lightning.conf", version_base="1.3"):
        return compose("train", overrides=["trainer=cpu", f"data.root={root}", *overrides])


def test_trainer_numbers_are_checked_before_the_data_load():
    check_config(composed("trainer.max_epochs=3", "trainer.limit_train_batches=0.5"))
    for override, message in (("trainer.max_epochs=abc", "trainer.max_epochs must be a number, got 'abc'"),
                              ("trainer.limit_val_batches=true", "trainer.limit_val_batches must be a number")):
        with pytest.raises(ConfigError, match=message):
            check_config(composed(override))


def test_a_file_in_the_run_directorys_way_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    check_run_dir(tmp_path / "new" / "run", None)  # nothing there yet: fine
    for run_dir in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        with pytest.raises(ConfigError, match="notes.txt is a file, not a folder; choose another hydra.run.dir"):
            check_run_dir(run_dir, None)


def test_lightnings_refusals_get_a_hint_that_fits():
    no_gpu = user_error(MisconfigurationException("No supported gpu backend found!"))
    assert "without a GPU use trainer=cpu" in str(no_gpu)
    epochs = user_error(MisconfigurationException("`max_epochs` must be a non-negative integer or -1."))
    assert str(epochs).endswith("(check the trainer.* settings)")
    wrapped = InstantiationException("Error in call to target 'lightning.pytorch.trainer.trainer.Trainer':\n"
                                     "ValueError('Precision 17 is invalid.')\nfull_key: trainer")
    wrapped.__cause__ = ValueError("Precision 17 is invalid.")
    assert str(user_error(wrapped)) == "trainer: Precision 17 is invalid."
    elsewhere = InstantiationException("Error in call to target 'x.Y':\nValueError('bug')\nfull_key: method")
    elsewhere.__cause__ = ValueError("bug")
    assert user_error(elsewhere) is None  # not the user's: its traceback stays
