"""Comparing runs: a real multirun over methods and seeds, and the report's numbers against its files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mcl_lightning.report import main as report_main
from mcl_lightning.report import report

from test_train import TINY, run_train


def _deployed_final(results: dict) -> float:
    return results["final"][f"peer{results['peers'] - 1}"]["top1"]


def test_multirun_over_methods_and_seeds_then_report_equals_the_files(tmp_path, data_root, capsys):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "method=independent,dml,mcl_okd", "seed=0,1", "peers=2", "backbone=resnet20",
                     f"data.root={data_root}", "data.batch_size=16", f"hydra.sweep.dir={sweep}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(sweep.rglob("results.json"))
    assert len(files) == 6
    runs = [json.loads(f.read_text()) for f in files]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in ("independent", "dml", "mcl_okd") for s in (0, 1))

    rows, md, csv_path = report(sweep)
    assert len(rows) == 3 and all(len(row["seeds"]) == 2 for row in rows)
    for row in rows:
        mine = [r for r in runs if r["method"] == row["method"]]
        for key, pick in (("deployed/final", _deployed_final),
                          ("peer_mean/best", lambda r: r["best"]["peer_mean"]["top1"]),
                          ("ensemble/final", lambda r: r["final"]["ensemble"]["top1"])):
            values = [pick(r) for r in mine]
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values))  # n - 1 = 1
            got_mean, got_std, n = row[key]
            assert n == 2 and got_mean == pytest.approx(mean) and got_std == pytest.approx(std)
    text = md.read_text()
    assert "| dml | resnet20 | 2 |" in text and "best*" in text  # CIFAR validates on the test set
    assert csv_path.read_text().count("\n") == 4  # header + 3 rows
    report_main([str(sweep), "--out", str(tmp_path / "again")])
    assert "6 runs in 3 rows" in capsys.readouterr().out


def test_report_keeps_other_settings_apart_and_shows_published_numbers(tmp_path):
    def fake_run(name: str, beta: float, seed: int, top1: float) -> None:
        section = {"peer0": {"top1": top1 - 0.01}, "peer1": {"top1": top1}, "peer_mean": {"top1": top1 - 0.005},
                   "ensemble": {"top1": top1 + 0.01}}
        results = {"method": "mcl_okd", "backbone": "resnet32", "peers": 2, "seed": seed, "epochs_run": 300,
                   "selection": "held-out", "final": section, "best": section,
                   "reference": {"source": "paper", "top1_error": {"peer": 24.52, "ensemble": 22.0}},
                   "config": {"seed": seed, "method": {"beta": beta}, "data": {"root": f"/data{seed}"}}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))

    fake_run("a", 0.025, 0, 0.70)
    fake_run("b", 0.025, 1, 0.72)
    fake_run("c", 0.05, 0, 0.60)
    rows, md, _ = report(tmp_path)
    assert [(r["settings"], r["seeds"]) for r in rows] == [("method.beta=0.025", [0, 1]), ("method.beta=0.05", [0])]
    assert rows[0]["deployed/final"][0] == pytest.approx(0.71)
    assert rows[1]["deployed/final"][1] is None  # one seed: no spread claimed
    text = md.read_text()
    assert "peer 75.48, ensemble 78.00" in text and "60.00 (1)" in text and "best*" not in text


def test_report_on_a_folder_without_results_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mcl_lightning.report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no results.json below" in proc.stderr and "Traceback" not in proc.stderr
