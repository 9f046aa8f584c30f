"""Output paths checked before any work: folders, files in the way, inputs and checkpoints never replaced."""

from __future__ import annotations

import pytest

from mcl_lightning.core.errors import ConfigError
from mcl_lightning.core.outputs import check_output_file, check_output_folder


def test_an_output_file_is_refused_with_the_fix_before_any_work(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    (tmp_path / "a.json").write_text("{}")
    cases = {
        tmp_path / "run": "is a folder",
        tmp_path / "a.json": "is the input it reads",
        tmp_path / "run" / "results.json": "would replace a checkpoint or a run's results",
        tmp_path / "last.ckpt": "would replace a checkpoint",
        tmp_path / "a.json" / "x.json": "a.json is a file, not a folder",
        "": "is empty",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_output_file(path, "--out", inputs=(tmp_path / "a.json",))
    with pytest.raises(ConfigError, match="does not exist; create it first"):
        check_output_file(tmp_path / "new" / "x.pt", "--out", create_parent=False)
    assert not (tmp_path / "new").exists()
    # an ordinary file: its folder is made, an earlier output of the same name may be replaced
    assert check_output_file(tmp_path / "new" / "eval.json", "--out") == tmp_path / "new" / "eval.json"
    assert (tmp_path / "new").is_dir()
    assert check_output_file(tmp_path / "a.json", "--out") == tmp_path / "a.json"
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "a.json" / "study", "--out")
