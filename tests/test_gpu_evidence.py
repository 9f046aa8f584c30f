"""`make gpu-evidence` on the CPU with tiny limits: the benchmark's headline tables, the probe, the plan,
the 3 recipes x 2 seeds study, reproduce.json and the report, through the very Make target a GPU lease
runs (with PY= the interpreter, as `PY=python3` on a machine without .venv); what comes back is the
output folder's five files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from mcl_lightning.tools import bench
from mcl_lightning.tools.study import PAPER_MATRIX

from test_entry_points import reencoded_root  # noqa: F401  (the fixture)

SHRUNK_BENCH = ("--backbone resnet8 --peers 2 --batch-size 8 --steps 1 --warmup 1 --repeats 1 --data-batches 1 "
                "--compile-backend aot_eager")
TINY_STUDY = ("trainer=cpu backbone=resnet8 data.check_integrity=false trainer.limit_train_batches=2 "
              "trainer.limit_val_batches=1 trainer.limit_test_batches=1 trainer.enable_progress_bar=false")


@pytest.mark.slow  # about 70 s: in make test-all and make test-oldest
def test_make_gpu_evidence_dry_run_on_cpu(reencoded_root, tmp_path):  # noqa: F811
    out = tmp_path / "evidence"
    args = (f"--minutes 6 --device cpu --bench-seconds 240 --bench-args '{SHRUNK_BENCH}' "
            "--reproduce-args '--concurrency 1,3 --probe-steps 7 --max-epochs 1'")
    proc = subprocess.run(["make", "-s", "gpu-evidence", f"PY={sys.executable}", f"EVIDENCE={out}",
                           f"DATA_ROOT={reencoded_root}", f"DATA_OPTS={TINY_STUDY}", f"GPU_EVIDENCE_ARGS={args}"],
                          capture_output=True, text=True, timeout=900, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # what a slot copies back: a few files directly under the output folder, the rest in one archive
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "evidence.json", "gpu-evidence.tar.gz",
                                                     "report.md", "reproduce.json"]
    assert all(p.stat().st_size < 16 << 20 for p in out.iterdir())
    with tarfile.open(out / "gpu-evidence.tar.gz") as tar:
        names = tar.getnames()
    assert sum(n.endswith("/results.json") for n in names) == 6 + 3 + 3  # the study's runs, the probe's jobs
    assert "evidence.work/bench.log" in names and "evidence.work/study.log" in names
    assert not [n for n in names if "checkpoints" in n]
    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["phase"] == "done" and evidence["bench"]["exit_status"] == 0 and evidence["study"]["exit_status"] == 0
    assert "nvidia_smi" in evidence["setup"] and evidence["study"]["runs"]["finished_runs"] == 6
    assert [t["target"] for t in evidence["targets"]][-2:] == [
        "at least 30 epochs reached by every run", "concurrent runs' total images/s >= 2x the same recipes run one at a time"]

    figures = json.loads((out / "bench.json").read_text())
    tables = {t["settings"]["name"]: t for t in figures["tables"]}
    assert list(tables) == [s.name for s in bench.preset("gpu_headline", "cpu")]
    for name, table in tables.items():
        assert "error" not in table and table["rows"], name
        assert table["rows"][0]["name"].startswith("floor")
    assert {r["name"] for r in tables["gpu_paper_batch64"]["rows"]} >= {"mcl_okd K=256"}
    assert tables["gpu_independent_fused_b256"]["settings"]["fuse_peers"]
    assert "fused_vs_loop" in figures

    record = json.loads((out / "reproduce.json").read_text())
    assert [lv["concurrency"] for lv in record["probe"]] == [1, 3] and all(lv["ok"] for lv in record["probe"])
    alone, shared = record["probe"]  # each recipe alone, then the three at once, all timed over a common window
    assert sorted(j["experiment"] for j in alone["jobs"]) == sorted(PAPER_MATRIX) == sorted(j["experiment"] for j in shared["jobs"])
    assert all(j["overlapped"] and j["timed_steps"] == 7 for j in alone["jobs"] + shared["jobs"])
    assert shared["concurrency_gain"] > 0 and record["phase"] == "done"
    assert record["plan"]["chosen"]["epochs"] == 1 and record["plan"]["chosen"]["concurrency"] in (1, 3)
    runs = record["study"]["runs"]
    assert sorted((r["experiment"], r["seed"]) for r in runs) == sorted((e, s) for e in PAPER_MATRIX for s in (0, 1))
    assert all(r["status"] == "finished" and r["epochs"] == 1 for r in runs)
    assert {"torch", "lightning", "hydra-core", "hydra-joblib-launcher"} <= set(record["versions"])
    assert [g["gap"] for g in record["gaps"]] == [f"{PAPER_MATRIX[0]} - {PAPER_MATRIX[1]}",
                                                 f"{PAPER_MATRIX[0]} - {PAPER_MATRIX[2]}"]
    assert record["gaps"][0]["published"] == 0.40 and record["gaps"][1]["published"] == 4.39
    report = (out / "report.md").read_text()
    for method in ("mcl_okd", "dml", "independent"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
        assert "(2)" in row, row  # two seeds in every row
    assert "gap (deployed peer" in report
    assert not list(out.with_name("evidence.work").rglob("*.ckpt"))  # checkpoints pruned from the work folder
