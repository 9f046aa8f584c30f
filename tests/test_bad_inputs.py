"""Every bad input is one line naming the problem and the fix, exit status 2, no traceback, and no
existing file changed (the finished run, the data copies and the checkpoint are hashed before/after)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FINISHED_RUN, run_cli


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file below ``roots`` (symlinked data is not followed)."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, finished_run, data_root):
    """A finished run, an unfinished copy of it, and data folders: good, truncated, corrupted."""
    root = tmp_path_factory.mktemp("bad")
    unfinished = root / "unfinished"
    shutil.copytree(finished_run, unfinished)
    (unfinished / "results.json").unlink()
    source = data_root / "cifar-100-python"
    for name, damage in (("truncated", lambda b: b[: len(b) // 3]), ("corrupted", lambda b: b[:5000] + b"\0" * 64 + b[5064:])):
        folder = root / name / "cifar-100-python"
        folder.mkdir(parents=True)
        shutil.copy(source / "meta", folder / "meta")
        (folder / "test").write_bytes(damage((source / "test").read_bytes()))
        (folder / "train").symlink_to(source / "train")
    return {"root": root, "finished": finished_run, "unfinished": unfinished, "data": data_root}


# (overrides, fragments the one error line must contain: the problem ... and the fix)
CASES = {
    "peers<=0": (["peers=0"], ["peers must be >= 1, got 0", "peers=4"]),
    "peers not a number": (["peers=abc"], ["peers must be a number", "peers=4"]),
    "unknown backbone": (["backbone=resnet99"], ["unknown backbone 'resnet99'", "resnet32", "wrn_16_2"]),
    "unknown peer backbone": (["peers=[resnet20,resnet99]"], ["unknown backbone 'resnet99'", "resnet56"]),
    "unknown method": (["method=foo"], ["unknown method 'foo'", "mcl_okd", "independent"]),
    "unknown data set": (["data=imagenet21k"], ["unknown data 'imagenet21k'", "cifar100", "cifar10"]),
    "unknown dataset name": (["data.dataset=svhn"], ["unknown data.dataset 'svhn'; choose one of", "cifar10, cifar100"]),
    "unknown trainer": (["trainer=tpu"], ["unknown trainer 'tpu'", "cpu", "ddp"]),
    "unknown option": (["method.nce=64"], ["unknown option method.nce (MCLOKD has no option 'nce')",
                                           "did you mean method.nce_k?", "method's options: projection_dim, nce_k"]),
    "unknown option added with +": (["+method.nce=64"], ["unknown option method.nce", "did you mean method.nce_k?"]),
    "unknown backbone option": (["backbone.branchpoint=2"], ["did you mean backbone.branch_point?"]),
    "unknown data option": (["data.batchsize=32"], ["CIFARDataModule has no option 'batchsize'", "data.batch_size?"]),
    "unknown perf option": (["perf.fuse=true"], ["did you mean perf.fuse_peers?", "channels_last"]),
    "unknown trainer option": (["trainer.max_epoch=3"], ["did you mean trainer.max_epochs?"]),
    "unknown experiment": (["experiment=cifar100/mcl_okd_resnet33"],
                           ["unknown experiment 'cifar100/mcl_okd_resnet33'; the closest: cifar100/mcl_okd_resnet32"]),
    "a Trainer argument without +": (["trainer.check_val_every_n_epoch=abc"],
                                     ["trainer.check_val_every_n_epoch must be a number, got 'abc'"]),
    "multirun: a job that cannot start": (["-m", "experiment=cifar100/mcl_okd_resnet32,cifar100/mcl_okd_resnet33",
                                           "hydra.sweep.dir={root}/sweep"],
                                          ["1 of 2 jobs of this multirun cannot start, so none was run: job 1 "
                                           "(experiment=cifar100/mcl_okd_resnet33): unknown experiment"]),
    "multirun: an option of some jobs": (["-m", "method=mcl_okd,dml", "hydra.sweep.dir={root}/sweep"],
                                         ["job 1 (method=dml): unknown option method.nce_k (DML has no option"]),
    "tau<=0": (["method.tau=0"], ["method.tau", "must be > 0"]),
    "projection width<=0": (["method.projection_dim=0"], ["method.projection_dim must be >= 1, got 0"]),
    "negative loss weight": (["method.beta=-0.5"], ["loss weights must be >= 0", "beta=-0.5"]),
    "bank momentum": (["method.bank_momentum=1.0"], ["method.bank_momentum must be in [0, 1), got 1.0"]),
    "sgd momentum": (["optim.momentum=1.5"], ["momentum in [0, 1)", "optim.momentum=1.5"]),
    "batch vs devices": (["trainer=ddp_cpu", "data.batch_size=63"],
                         ["data.batch_size=63", "divisible by the number of devices (2)", "data.batch_size=62 or 64"]),
    "ddp timeout<=0": (["trainer=ddp_cpu", "trainer.strategy.timeout_s=0"],
                       ["trainer.strategy.timeout_s must be a number of seconds > 0, got 0"]),
    "missing data folder": (["data.root={root}/nowhere"], ["data.root={root}/nowhere", "is not a folder", "fix the path"]),
    "missing checkpoint": (["ckpt_path={root}/nope.ckpt"], ["ckpt_path={root}/nope.ckpt does not exist", "ckpt_path=last"]),
    "finished run dir": (["hydra.run.dir={finished}"],
                         ["{finished} already holds a finished run", "Choose another hydra.run.dir", "ckpt_path=last"]),
    "unfinished run dir": (["hydra.run.dir={unfinished}"],
                           ["{unfinished} holds an unfinished run", "Resume it with ckpt_path=last"]),
    "checkpoint: peer count": (["peers=3", "ckpt_path={ckpt}"], ["different configuration", "peers: checkpoint 2, now 3"]),
    "checkpoint: backbone": (["backbone=resnet32", "ckpt_path={ckpt}"], ["backbone: checkpoint resnet20, now resnet32"]),
    "checkpoint: bank width": (["method.projection_dim=8", "ckpt_path={ckpt}"],
                               ["method.projection_dim: checkpoint 16, now 8", "Resume with the checkpoint's settings"]),
    "checkpoint: bank rows": (["data.val_split=5000", "ckpt_path={ckpt}"],
                              ["data.val_split: checkpoint 0, now 5000", "memory banks"]),
    # these three need the data: caught at setup, before the first step
    "nce_k > negative pool": (["method.nce_k=60000"], ["method.nce_k=60000 exceeds the 49500 negatives",
                                                         "method.negatives_with_replacement=true"]),
    "truncated CIFAR file": (["data.root={root}/truncated"], ["truncated/cifar-100-python/test has md5", "Re-download"]),
    "corrupted CIFAR file": (["data.root={root}/corrupted"], ["corrupted/cifar-100-python/test has md5", "Re-download"]),
}


# The unknown-option cases of one kind share one code path (Hydra's MissingConfigException or check_choice):
# one of each kind runs by default, the others in make test-all.
SAME_PATH = {"unknown peer backbone", "unknown method", "unknown data set", "unknown trainer", "unknown option added with +",
             "unknown backbone option", "unknown data option", "unknown perf option", "unknown trainer option",
             "multirun: an option of some jobs"}


@pytest.mark.parametrize("case", [c if c not in SAME_PATH else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_bad_input_is_one_clear_line_exit_2_and_changes_nothing(case, workspace, tmp_path):
    overrides, fragments = CASES[case]
    names = {"root": workspace["root"], "finished": workspace["finished"], "unfinished": workspace["unfinished"],
             "ckpt": workspace["finished"] / "checkpoints" / "last.ckpt"}
    overrides = [o.format(**names) for o in overrides]
    keys = {o.split("=")[0] for o in overrides}
    base = [o for o in [*FINISHED_RUN[:5], f"data.root={workspace['data']}", f"hydra.run.dir={tmp_path / 'run'}"]
            if o.split("=")[0] not in keys]
    before = snapshot(workspace["root"], workspace["finished"])
    flags = [o for o in overrides if o.startswith("-")]  # -m before the overrides, as Hydra's parser wants
    proc = run_cli("mcl_lightning.train", *flags, *base, *[o for o in overrides if o not in flags], timeout=600)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    line = one_error_line(proc.stderr)
    for fragment in fragments:
        assert fragment.format(**names) in line, line
    assert snapshot(workspace["root"], workspace["finished"]) == before
    if not case.startswith(("nce_k", "truncated", "corrupted")):  # caught before Hydra writes anything
        assert not (tmp_path / "run").exists() and not (workspace["root"] / "sweep").exists()


def test_non_finite_loss_stops_at_once_keeps_the_last_good_checkpoint(tmp_path, data_root):
    """A method whose loss turns NaN at its 4th step: stopped there, named, recorded; step 2's checkpoint kept."""
    (tmp_path / "nan_method.py").write_text(
        "from mcl_lightning.methods import OKDMethod\n"
        "from mcl_lightning.methods.losses import cross_entropy_per_peer\n\n"
        "class ExplodeAt(OKDMethod):\n"
        "    def __init__(self, step: int = 4) -> None:\n"
        "        super().__init__()\n"
        "        self.step, self.calls = step, 0\n\n"
        "    def forward(self, output, labels, indices):\n"
        "        self.calls += 1\n"
        "        ce = cross_entropy_per_peer(output.logits, labels).sum()\n"
        "        return {'ce': ce, 'blowup': ce * (float('nan') if self.calls >= self.step else 0.0)}\n"
    )
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "explode.yaml").write_text("_target_: nan_method.ExplodeAt\nstep: 4\n")
    run_dir = tmp_path / "run"
    proc = run_cli("mcl_lightning.train", "method=explode", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                   "peers=2", "backbone=resnet20", "data.batch_size=16", f"data.root={data_root}",
                   "trainer.limit_train_batches=6", "trainer.enable_progress_bar=false", "checkpoint.every_n_steps=2",
                   f"hydra.run.dir={run_dir}", env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc.stderr)
    for fragment in ("loss term 'blowup' became nan at optimizer step 4", "(epoch 0, batch 3)", "Lower optim.lr",
                     "ckpt_path=last"):
        assert fragment in line, line
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed"
    assert {k: results["failure"][k] for k in ("term", "value", "step", "epoch", "batch")} == {
        "term": "blowup", "value": "nan", "step": 4, "epoch": 0, "batch": 3}
    last = torch.load(results["checkpoints"]["last"], map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # the step-2 checkpoint, not overwritten by the bad state
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_state_mismatch_after_setup_is_named():
    """The backstop in OKDSystem.on_load_checkpoint: shapes and keys that differ, by name."""
    from mcl_lightning.runtime.checkpointing import state_differences

    saved = {"method.memory_bank.memory": torch.zeros(2, 45000, 16), "peers.fc.weight": torch.zeros(3), "old": torch.zeros(1)}
    now = {"method.memory_bank.memory": torch.zeros(2, 50000, 16), "peers.fc.weight": torch.zeros(3), "new": torch.zeros(1)}
    assert state_differences(saved, now) == [
        "bank size: checkpoint (2, 45000, 16), now (2, 50000, 16)", "only in the checkpoint: old",
        "missing from the checkpoint: new"]


def test_a_sweep_directory_holding_runs_is_refused(workspace, data_root):
    sweep = workspace["finished"].parent  # holds run/results.json and run/checkpoints/
    before = snapshot(sweep)
    proc = run_cli("mcl_lightning.train", "-m", "seed=0,1", "peers=2", "backbone=resnet20", f"data.root={data_root}",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"hydra.sweep.dir={sweep} already holds runs (run/" in line and "Choose another hydra.sweep.dir" in line
    assert snapshot(sweep) == before
