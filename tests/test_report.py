"""Comparing runs: a real multirun over methods and seeds, and the report's numbers against its files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mcl_lightning.tools.report import main as report_main
from mcl_lightning.tools.report import report

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


def test_report_names_a_damaged_or_foreign_file_and_a_bad_out_in_one_line(tmp_path, capsys):
    good = {"method": "dml", "backbone": "resnet32", "peers": 2, "seed": 0, "final": {}, "best": {}, "config": {}}
    cases = {
        "truncated": ('{"method": "dml", "backb', "results.json cannot be read as a run's results.json"),
        "evaluation": (json.dumps({"checkpoint": "x.ckpt", "test": {}}), "is not a training run's results.json (no"),
        "binary": (b"PK\x03\x04\xff\xfe", "results.json cannot be read as a run's results.json"),
    }
    for name, (content, message) in cases.items():
        folder = tmp_path / name
        (folder / "ok").mkdir(parents=True)
        (folder / "ok" / "results.json").write_text(json.dumps(good))
        (folder / "bad").mkdir()
        write = (folder / "bad" / "results.json").write_bytes if isinstance(content, bytes) else \
            (folder / "bad" / "results.json").write_text
        write(content)
        with pytest.raises(SystemExit) as exit_:
            report_main([str(folder)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and str(folder / "bad") in err, err
        assert len(err.strip().splitlines()) == 1 and not (folder / "report.md").exists()
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text("hydra: {sweeper: [")
    runs = tmp_path / "evaluation" / "ok"
    for argv, message in (([str(sweep)], "hydra.yaml cannot be read"),
                          ([str(runs), "--out", str(runs / "results.json" / "x")], "results.json is a file, not a folder"),
                          ([str(runs), "--out", ""], "--out is empty")):
        with pytest.raises(SystemExit) as exit_:
            report_main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_report_names_what_tells_rows_apart_and_gives_wall_time_and_machine(tmp_path):
    """Options of different methods are not listed as settings (the method column says it); options
    that differ between rows of one method are, and so are non-method settings, with the topology the
    run used (not the config's null) and without copies of the named columns (model.peers); wall time
    and the machine come from each results.json."""
    cpu = {"cpu": "Some CPU", "torch_threads": 1, "accelerator": "cpu"}

    def fake_run(name: str, method: dict, peers: int, wall: float, seed: int = 0, machine: dict = cpu) -> None:
        section = {f"peer{peers - 1}": {"top1": 0.5}, "peer_mean": {"top1": 0.5}, "ensemble": {"top1": 0.6}}
        results = {"method": method["name"], "backbone": "resnet8", "peers": peers, "seed": seed, "epochs_run": 5,
                   "topology": "independent" if method["name"] == "independent" else "shared_trunk",
                   "selection": "test-selected", "final": section, "best": section, "wall_time_s": wall,
                   "machine": machine, "config": {"seed": seed, "method": method["options"], "peers": peers,
                                                  "model": {"peers": peers, "topology": None}, "topology": None}}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))

    mcl = {"_target_": "MCLOKD", "alpha": 1.0, "beta": 0.025, "nce_k": 256}
    fake_run("full0", {"name": "mcl_okd", "options": mcl}, 4, 600.0)
    fake_run("full1", {"name": "mcl_okd", "options": mcl}, 4, 660.0, seed=1)
    fake_run("no_teacher", {"name": "mcl_okd", "options": {**mcl, "alpha": 0.0}}, 4, 590.0,
             machine={"accelerator": "NVIDIA H100 80GB HBM3"})
    fake_run("dml", {"name": "dml", "options": {"_target_": "DML", "alpha": 1.0, "kd_temperature": 2.0}}, 4, 500.0)
    fake_run("single", {"name": "independent", "options": {"_target_": "Independent"}}, 1, 120.0)
    rows, md, csv_path = report(tmp_path)
    settings = {(r["method"], r["peers"], r["settings"]) for r in rows}
    assert settings == {("mcl_okd", 4, "method.alpha=1.0 topology=shared_trunk"),
                        ("mcl_okd", 4, "method.alpha=0.0 topology=shared_trunk"),
                        ("dml", 4, "topology=shared_trunk"), ("independent", 1, "topology=independent")}
    full = next(r for r in rows if r["settings"].startswith("method.alpha=1.0"))
    mean, std, n = full["wall_time_min"]
    assert (mean, n) == (pytest.approx(10.5), 2) and std == pytest.approx(math.sqrt(2 * 0.5 ** 2))
    text = md.read_text()
    assert "10.5 ± 0.7 (2) [m1]" in text and "[m1] Some CPU, 1 thread" in text
    assert "9.8 (1) [m2]" in text and "[m2] NVIDIA H100 80GB HBM3" in text
    assert "10.50,0.71,\"Some CPU, 1 thread\"" in csv_path.read_text()
