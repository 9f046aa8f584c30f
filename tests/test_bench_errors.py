"""A user's mistake in bench, reproduce or gpu_evidence: one line (``error: ...`` or argparse's usage
error), exit status 2, before any work and with nothing written. In-process, nothing measured."""

from __future__ import annotations

import re
import shlex

import pytest
import torch

from mcl_lightning.tools import bench, gpu_evidence, reproduce
from mcl_lightning.tools.bench import cli
from mcl_lightning.core.errors import ConfigError


def fails(main, argv, capsys) -> str:
    """``main(argv)`` exits with status 2 and one line on stderr, no traceback: that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


# -- bench -------------------------------------------------------------------------------------
def test_bench_json_in_the_way_is_refused_before_the_benchmark(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for path, says in ((tmp_path, "is a folder"), (tmp_path / "file" / "b.json", "is a file, not a folder")):
        err = fails(bench.main, ["--device", "cpu", "--preset", "tiny", "--json", str(path)], capsys)
        assert err.startswith("error: --json") and says in err


def test_bench_device_is_checked_up_front(monkeypatch, capsys):
    assert "is not a device" in fails(bench.main, ["--device", "bogus"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "use --device cpu" in fails(bench.main, ["--device", "cuda", "--preset", "tiny"], capsys)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "1 GPU(s)" in fails(bench.main, ["--device", "cuda:3", "--preset", "tiny"], capsys)


@pytest.mark.parametrize("argv, says", [
    (["--threads", "-1"], "--threads: must be >= 1"),
    (["--data-k", "abc"], "--data-k: 'abc'"),
    (["--data-batches", "0"], "--data-batches: must be >= 1"),
    (["--max-seconds", "-5"], "--max-seconds: must be > 0"),
    (["--peers", "0"], "--peers: must be >= 1"),
    (["--rows", "mcl_okd@abc"], "error: --rows mcl_okd@abc: K after @"),
    (["--rows", "mcl_okd:bogus=1"], "unexpected keyword argument 'bogus'"),
    (["--rows", "mcl_okd:tau=1x"], "is not key=value"),
    (["--preset", "gpu", "--rows", "nosuch"], "unknown method 'nosuch'"),
    (["--backbone", "nosuch"], "unknown backbone 'nosuch'"),
    (["--profile", "bogus"], "--profile: no row named 'bogus'"),
])
def test_bench_bad_options_are_one_line(argv, says, capsys):
    assert says in fails(bench.main, ["--device", "cpu", *argv], capsys)


def test_a_users_mistake_in_one_table_stops_the_run(monkeypatch, tmp_path, capsys):
    def table(*args, **kwargs):
        raise ConfigError("a mistake every table would make")

    monkeypatch.setattr(cli, "data_module", lambda args, batch_size: type("DM", (), {})())
    monkeypatch.setattr(cli, "run_table", table)
    path = tmp_path / "b.json"
    err = fails(bench.main, ["--device", "cpu", "--preset", "gpu", "--json", str(path)], capsys)
    assert err == "error: a mistake every table would make" and not path.exists()


def test_bench_default_data_root_does_not_depend_on_the_current_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MCL_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    err = fails(bench.main, ["--device", "cpu", "--preset", "tiny"], capsys)
    assert f"the default data folder {tmp_path / 'cache' / 'mcl_lightning' / 'data'}" in err and "--data-root" in err
    monkeypatch.setenv("MCL_DATA_ROOT", str(tmp_path / "nowhere"))
    assert f"MCL_DATA_ROOT={tmp_path / 'nowhere'} is not a folder" in fails(bench.main, ["--device", "cpu"], capsys)
    err = fails(bench.main, ["--device", "cpu", "--data-root", str(tmp_path / "typo")], capsys)
    assert f"--data-root {tmp_path / 'typo'} is not a folder" in err


def test_bench_options_may_follow_data_overrides():
    args = bench.parse_args(["data.check_integrity=false", "--device", "cpu", "data.num_workers=0", "--steps", "3"])
    assert args.data == ["data.check_integrity=false", "data.num_workers=0"] and args.steps == 3


# -- reproduce ---------------------------------------------------------------------------------
def test_reproduce_refuses_a_budget_too_small_and_zero_epochs(capsys):
    assert "--minutes 0.1 leaves no time" in fails(reproduce.main, ["--minutes", "0.1"], capsys)
    assert "--max-epochs must be >= 1" in fails(reproduce.main, ["--max-epochs", "0"], capsys)


def test_reproduce_out_under_a_file_and_options_after_overrides(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = fails(reproduce.main, ["trainer=cpu", "--out", str(tmp_path / "file" / "study"), "data.root=/d"], capsys)
    assert err == f"error: --out: {tmp_path / 'file'} is a file, not a folder; pass a path in a folder"
    args = reproduce.parse_args(["trainer=cpu", "--out", str(tmp_path / "s"), "data.root=/d", "--seeds", "3"])
    assert args.overrides == ["trainer=cpu", "data.root=/d"] and args.seeds == [3]


# -- gpu_evidence --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, says", [
    (["--reproduce-args", "--seeds a"], "--reproduce-args / study overrides: --seeds"),
    (["--reproduce-args", "--max-epochs 0"], "--max-epochs must be >= 1"),
    (["--bench-args", '--steps "1'], "--bench-args '--steps \"1': No closing quotation"),
    (["--minutes", "3"], "--minutes 3 leaves the study 5 s"),
    (["--minutes", "4", "--bench-seconds", "600"], "--bench-seconds 600 must be > 20 and less than --minutes 4"),
    (["--reproduce-args", "--out x"], "--out is set by gpu_evidence"),
    (["--reproduce-args=--minutes=3"], "--minutes=3 is set by gpu_evidence"),
])
def test_gpu_evidence_checks_the_study_before_the_benchmark(argv, says, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_evidence, "run_child", lambda *a, **k: pytest.fail("a step started"))
    out = tmp_path / "evidence"
    assert says in fails(gpu_evidence.main, ["trainer=cpu", "--out", str(out), *argv], capsys)
    assert not out.exists()


def test_gpu_evidence_out_under_a_file_and_options_after_overrides(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = fails(gpu_evidence.main, ["trainer=cpu", "--out", str(tmp_path / "file" / "ev"), "data.root=/"], capsys)
    assert err == f"error: --out: {tmp_path / 'file'} is a file, not a folder; pass a path in a folder"
    args = gpu_evidence.parse_args(["trainer=cpu", "--bench-args", "--steps 1 --rows x", "data.root=/", "--minutes", "5"])
    assert (args.overrides, args.bench_args, args.minutes) == (["trainer=cpu", "data.root=/"], "--steps 1 --rows x", 5)


# -- the docstrings' example commands ------------------------------------------------------------
def doc_commands(module) -> list[list[str]]:
    text = re.sub(r"\\\n\s*", " ", module.__doc__)
    lines = [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("python -m ")]
    return [[t for t in shlex.split(line)[3:] if t != "..."] for line in lines]


def test_every_docstring_example_parses(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    commands = {m: doc_commands(m) for m in (bench, reproduce, gpu_evidence)}
    assert all(commands.values())
    for argv in commands[bench]:
        bench.settings_from_args(bench.parse_args(argv))
    for argv in commands[reproduce]:
        reproduce.parse_args(argv)
    for argv in commands[gpu_evidence]:
        args = gpu_evidence.parse_args([re.sub("^data.root=.*", f"data.root={tmp_path}", a) for a in argv])
        gpu_evidence.check_args(args)
        bench.parse_args(shlex.split(args.bench_args))
