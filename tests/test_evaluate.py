"""Evaluate and look: evaluation equals what training logged, a system loads from its checkpoint alone,
a torch.export program of the deployed peer, curves.png."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import run_cli
from mcl_lightning import OKDSystem, create_backbone
from mcl_lightning.tools.curves import DPI, FIGSIZE
from mcl_lightning.models import count_parameters


def test_evaluate_cli_equals_what_training_logged_for_the_same_checkpoint(finished_run, data_root, tmp_path):
    out = tmp_path / "eval.json"
    proc = run_cli("mcl_lightning.evaluate", str(finished_run / "checkpoints" / "last.ckpt"), f"data.root={data_root}",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert evaluated["test_images"] == 10_000 and evaluated["epoch"] == 1
    trained = json.loads((finished_run / "results.json").read_text())["test"]  # training's test pass, last weights
    assert set(evaluated["test"]) - {"num_images"} == {"peer0", "peer1", "peer_mean", "ensemble", "best_peer"}
    assert evaluated["test"].get("num_images", 10_000) == 10_000  # every test image exactly once
    assert evaluated["test"] == trained
    logged = [row for row in csv.DictReader((finished_run / "csv" / "metrics.csv").open()) if row.get("test/ensemble/top1")]
    assert float(logged[-1]["test/ensemble/top1"]) == pytest.approx(evaluated["test"]["ensemble"]["top1"], abs=1e-7)
    for name in ("peer0", "peer1", "peer_mean", "ensemble"):  # the printed table
        assert f"{100 * evaluated['test'][name]['top1']:7.2f}" in proc.stdout


def test_evaluate_a_missing_checkpoint_or_bad_argument_is_one_line(tmp_path):
    proc = run_cli("mcl_lightning.evaluate", str(tmp_path / "none.ckpt"))
    assert proc.returncode == 2 and "none.ckpt does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("mcl_lightning.evaluate", str(tmp_path / "none.ckpt"), "root=/x")
    assert proc.returncode == 2 and "data.<option>=<value>" in proc.stderr and "Traceback" not in proc.stderr


def test_export_and_evaluate_refuse_a_wrong_path_or_peer_with_one_line(finished_run, data_root, tmp_path, capsys):
    from mcl_lightning import evaluate, export
    from mcl_lightning.core.errors import UserError

    last = finished_run / "checkpoints" / "last.ckpt"
    not_a_checkpoint = tmp_path / "results.json"
    not_a_checkpoint.write_text((finished_run / "results.json").read_text())
    out = ["--out", str(tmp_path / "peer.pt")]
    exported, a_list = tmp_path / "exported.pt", tmp_path / "list.pt"
    torch.save(create_backbone("resnet20", num_classes=100).state_dict(), exported)
    torch.save([1, 2], a_list)
    before = {p: p.stat().st_mtime_ns for p in (last, finished_run / "results.json")}
    cases = [
        (export.main, [str(tmp_path / "none.ckpt"), *out], "none.ckpt does not exist"),
        (export.main, [str(finished_run), *out], f"is a folder; pass a checkpoint file, e.g. {last}"),
        (export.main, [str(not_a_checkpoint), *out], "results.json is not a checkpoint"),
        (export.main, [str(last), "--peer", "2", *out], "--peer 2: the checkpoint has 2 peers; pass 0 to 1"),
        (export.main, [str(last), "--out", str(tmp_path / "missing" / "peer.pt")], "missing does not exist; create it"),
        (export.main, [str(last), "--out", str(last)], "is the input it reads"),
        (export.main, [str(last), "--out", str(finished_run / "results.json")], "would replace a checkpoint or a run's"),
        (export.main, [str(last), *out, "--program", str(finished_run)], "is a folder; pass a file name"),
        (export.main, [str(exported), *out], "holds a network's weights (a state_dict, as export writes), not a"),
        (export.main, [str(a_list), *out], "holds a list without a state_dict, not a training checkpoint"),
        (evaluate.main, [str(last), "--out", str(last)], "is the input it reads"),
        (evaluate.main, [str(last), "--out", str(finished_run / "results.json")], "would replace a checkpoint or a"),
        (evaluate.main, [str(last), "--out", str(finished_run)], "is a folder; pass a file name"),
        (evaluate.main, [str(last), f"data.root={data_root}", "data.bogus=1"], "unknown data option data.bogus for"),
        (evaluate.main, [str(last), f"data.root={data_root}", "data.dataset=cifar10"],
         "the checkpoint was trained with data.dataset=cifar100"),
        (evaluate.main, [str(last), "--precision", "17", f"data.root={data_root}"], "--precision 17: Precision"),
        (evaluate.main, [str(finished_run)], "is a folder"),
        (evaluate.main, [str(not_a_checkpoint)], "is not a checkpoint"),
    ]
    for entry, argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            entry(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "peer.pt").exists()
    assert before == {p: p.stat().st_mtime_ns for p in before}  # the run's files untouched
    with pytest.raises(UserError, match="is a folder"):
        OKDSystem.from_checkpoint(finished_run)


def test_a_trained_system_loads_from_its_checkpoint_alone(finished_run):
    path = finished_run / "checkpoints" / "last.ckpt"
    system = OKDSystem.from_checkpoint(path).eval()  # no Hydra, no arguments
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["method_spec"]["target"] == "mcl_lightning.methods.mcl_okd.MCLOKD"
    assert system.method.constructor_options == saved["method_spec"]["options"]
    assert system.method.negatives.k == 32 and system.peers.num_peers == 2
    for key, value in system.state_dict().items():  # peers, heads and banks
        assert torch.equal(value, saved["state_dict"][key]), key


def test_export_writes_a_torch_export_program_of_the_deployed_peer(finished_run, tmp_path):
    path = finished_run / "checkpoints" / "last.ckpt"
    program_path = tmp_path / "peer1.pt2"
    proc = run_cli("mcl_lightning.export", str(path), "--program", str(program_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    program = torch.export.load(program_path)
    deployed = program.module()
    plain = create_backbone("resnet20", num_classes=100)
    assert sum(p.numel() for p in program.parameters()) == count_parameters(plain) == count_parameters(deployed)
    system = OKDSystem.from_checkpoint(path).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), system.peers(x).logits[-1])
        torch.testing.assert_close(deployed(x[:1]), system.peers(x[:1]).logits[-1])  # any batch size


def test_every_run_writes_curves_and_report_redraws_them(finished_run, tmp_path):
    from PIL import Image

    size = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    with Image.open(finished_run / "curves.png") as image:  # written by the run itself
        assert image.format == "PNG" and image.size == size
    sweep = tmp_path / "sweep"
    for name in ("0", "1"):  # a sweep of two runs, from the finished run's CSV log
        (sweep / name / "csv").mkdir(parents=True)
        (sweep / name / "csv" / "metrics.csv").write_bytes((finished_run / "csv" / "metrics.csv").read_bytes())
    proc = run_cli("mcl_lightning.report", "--curves", str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("0", "1"):
        with Image.open(sweep / name / "curves.png") as image:
            assert image.size == size
    proc = run_cli("mcl_lightning.report", "--curves", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_curves_read_every_series_and_let_a_resumed_epoch_win(tmp_path):
    from mcl_lightning.tools.curves import plot_run, read_epoch_series

    (tmp_path / "csv").mkdir()
    rows = ["epoch,step,train/loss,train/loss/ce,val/peer0/top1,val/ensemble/top1",
            "0,9,5.0,4.0,,", "0,9,,,0.10,0.12", "1,19,4.5,3.5,,",  # killed after epoch 1's training metrics
            "1,19,4.4,3.4,,", "1,19,,,0.20,0.25"]  # the resumed run logs epoch 1 again
    (tmp_path / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    series = read_epoch_series(tmp_path / "csv" / "metrics.csv")
    assert series["train/loss"] == {0: 5.0, 1: 4.4} and series["val/ensemble/top1"] == {0: 0.12, 1: 0.25}
    assert plot_run(tmp_path).stat().st_size > 10_000
