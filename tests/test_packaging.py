"""The package as users meet it: a wheel installed in a fresh venv, and the documented Python examples."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import doc_block

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _clean_copy(dest: Path) -> Path:
    """The files a fresh clone would have (tracked, or untracked and not ignored): no stale build/."""
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def test_wheel_install_trains_from_outside_the_checkout(tmp_path, data_root):
    source = _clean_copy(tmp_path / "source")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(source)])
    wheel = next((tmp_path / "dist").glob("mcl_lightning-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # conf/ ships whole, as mcl_lightning/conf
        shipped = {n.removeprefix("mcl_lightning/conf/") for n in archive.namelist()
                   if n.startswith("mcl_lightning/conf/") and n.endswith(".yaml")}
    assert shipped == {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # The dependencies (torch, lightning, ...) come from this environment's site-packages through a
    # .pth line; paths added that way are not site dirs, so the editable install's finder stays out.
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "_deps_from_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MCL_DATA_ROOT")}
    where = _run([str(python), "-c", "import mcl_lightning; print(mcl_lightning.__file__)"], cwd=outside, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    run_dir = tmp_path / "run"
    _run([str(python), "-m", "mcl_lightning.train", "peers=2", "backbone=resnet20", "method=independent",
          f"data.root={data_root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=1",
          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
          "trainer.enable_progress_bar=false"], cwd=outside, env=env)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["peers"] == 2 and results["method"] == "independent"
    # the configs inside the wheel are reachable through Hydra's pkg:// search path
    probe = ("from hydra import compose, initialize_config_module\n"
             "with initialize_config_module('mcl_lightning.conf', version_base='1.3'):\n"
             "    print(compose('train', overrides=['backbone=wrn_40_2']).backbone.name)")
    assert _run([str(python), "-c", probe], cwd=outside, env=env).stdout.strip() == "wrn_40_2"


def python_examples() -> str:
    """The quick start (README.md, mirrored in docs/guide/python.md) and its continuation with your own modules."""
    return doc_block("python-api", "python") + "\n" + doc_block("python-api-modules", "python")


def test_python_examples_run(tmp_path, data_root):
    code = python_examples()
    fast = ("L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1, "
            f"default_root_dir={str(tmp_path)!r}, enable_progress_bar=False)")  # Lightning's default logger: as written
    assert code.count("L.Trainer(max_epochs=300)") == 2
    code = code.replace("L.Trainer(max_epochs=300)", fast).replace('"/path/to/data"', repr(str(data_root)))
    code += "\nassert type(deployed).__name__ == 'StagedBackbone'\nprint('examples ok')\n"
    proc = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert "examples ok" in proc.stdout


def test_own_method_example_runs_through_the_cli_from_one_file_and_one_yaml(tmp_path, data_root):
    """docs/extending.md's "A method" example, written outside the library, trained by the entry point."""
    code, yaml = doc_block("own-method", "python"), doc_block("own-method-yaml", "yaml")
    (tmp_path / "my_methods.py").write_text(code)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "ensemble_kd.yaml").write_text(yaml)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    _run([sys.executable, "-m", "mcl_lightning.train", "method=ensemble_kd", f"hydra.searchpath=[file://{tmp_path}/conf]",
          "peers=2", "backbone=resnet20", f"data.root={data_root}", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2",
          "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
          "trainer.enable_progress_bar=false"], cwd=tmp_path, env=env)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "ensemble_kd" and results["epochs_run"] == 2
    assert results["topology"] == "shared_trunk"  # the base class's reference layout
    logged = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss/ensemble_kd" in logged and "train/loss/ce" in logged
