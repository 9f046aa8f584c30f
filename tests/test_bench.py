"""The benchmark end to end with tiny settings (seconds): the JSON holds every figure and setting.
No speed assertions: throughput is measured by `make bench`, never asserted in tests."""

from __future__ import annotations

import json
import os

import pytest

from mcl_lightning.tools import bench
from mcl_lightning.core.errors import ConfigError

SETTING_FIELDS = {"backbone", "peers", "topology", "batch_size", "rows", "precision", "compile", "compile_backend",
                  "channels_last", "fuse_peers", "device_resident", "device", "steps", "warmup", "repeats", "statistic"}
ROW_FIELDS = {"name", "method", "kind", "images_per_s", "ms_per_step", "ratio_to_floor", "images_per_s_runs",
              "ratio_to_floor_runs", "ratio_to_floor_cpu_time", "peak_memory_bytes", "peak_memory_kind"}


def test_tiny_benchmark_end_to_end(tmp_path, data_root, capsys):
    path = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--device", "cpu", "--data-root", str(data_root), "--json", str(path),
                "--rows", "independent;mcl_okd@64;dml", "--profile", "floor (plain CE loop);mcl_okd K=64"])
    results = json.loads(path.read_text())
    assert {"device_name", "torch_version", "lightning_version", "threads", "omp_wait_policy", "tables"} <= set(results)
    # measured in the caller's threading environment (no restart under PASSIVE), which the JSON records
    threading = results["threading"]
    assert {"OMP_WAIT_POLICY", "OMP_NUM_THREADS", "torch_threads", "interop_threads"} == set(threading)
    assert threading["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "(unset)") == results["omp_wait_policy"]
    assert threading["torch_threads"] >= 1 and threading["interop_threads"] >= 1
    (table,) = results["tables"]
    assert SETTING_FIELDS <= set(table["settings"]) and table["settings"]["statistic"] == "median over repeats"
    names = [r["name"] for r in table["rows"]]
    assert names == ["floor (plain CE loop)", "independent", "mcl_okd K=64", "dml", "mcl_okd K=64 (plain loop)"]
    for row in table["rows"]:
        assert ROW_FIELDS <= set(row), row["name"]
        assert row["images_per_s"] > 0 and row["peak_memory_bytes"] is not None
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["floor (plain CE loop)"]["ratio_to_floor"] == 1.0
    assert rows["mcl_okd K=64"]["ratio_to_plain_loop"] > 0  # Lightning against the same maths by hand
    data = {r["name"]: r["images_per_s"] for r in table["data_path"]}
    assert set(data) == {"loader + augmentation", "+ negative sampling K=64"} and min(data.values()) > 0
    memory = table["contrastive_memory"]
    assert memory["reference_gathered_bytes"] == 2 * 1 * 8 * 513 * 128 * 4 and memory["peak_bytes"] > 0
    floor, lightning = table["profiles"]  # each row profiled the way it runs: plain loop, Trainer
    assert (floor["row"], floor["kind"], lightning["row"], lightning["kind"]) == (
        "floor (plain CE loop)", "plain loop", "mcl_okd K=64", "lightning")
    assert all(p["top"] and p["wall_ms_per_step"] > 0 and p["outside_ops_ms_per_step"] is not None
               for p in (floor, lightning))
    assert table["targets"] == []  # tiny settings are not the issue's: no target applies
    out = capsys.readouterr().out
    assert "x floor" in out and "mcl_okd K=64" in out and "contrastive term alone" in out


GPU_DRY_RUN = ["--preset", "gpu", "--device", "cpu", "--backbone", "resnet20", "--peers", "2", "--batch-size", "8",
               "--steps", "1", "--warmup", "1", "--repeats", "1", "--data-batches", "1", "--memory-k", "64",
               "--compile-backend", "aot_eager", "--rows", "mcl_okd@32", "--plain", ""]


def _gpu_dry_run(tmp_path, data_root, *extra):
    path = tmp_path / "gpu.json"
    bench.main([*GPU_DRY_RUN, "--data-root", str(data_root), "--json", str(path), *extra])
    tables = {t["settings"]["name"]: t for t in json.loads(path.read_text())["tables"]}
    for name, table in tables.items():
        assert "error" not in table, (name, table.get("error"))
        assert table["rows"], name
    return tables


def test_gpu_preset_runs_on_cpu_with_tiny_settings(tmp_path, data_root):
    """`make bench-gpu`'s code path on the CPU, shrunk: bf16 autocast, channels_last, compile,
    device-resident data, and fused peers. CUDA graphs (reduce-overhead) and the CUDA sync counter
    only exist on a GPU and are not exercised here (compile uses the aot_eager backend)."""
    tables = _gpu_dry_run(tmp_path, data_root, "--tables", "gpu_paper_batch64;gpu_independent_fused_b256")
    assert list(tables) == ["gpu_paper_batch64", "gpu_independent_fused_b256"]
    paper = tables["gpu_paper_batch64"]["settings"]
    assert paper["precision"] == "bf16" and paper["channels_last"] and paper["device_resident"] and paper["compile"]
    assert tables["gpu_independent_fused_b256"]["settings"]["fuse_peers"]
    assert "compile_counters" in tables["gpu_paper_batch64"]


@pytest.mark.slow
def test_every_gpu_table_runs_on_cpu_with_tiny_settings(tmp_path, data_root):
    tables = _gpu_dry_run(tmp_path, data_root)
    assert list(tables) == [s.name for s in bench.preset("gpu", "cpu")]


def test_row_syntax_and_settings_errors():
    assert bench.parse_row("mcl_okd@256") == ("mcl_okd", {"nce_k": 256})
    assert bench.parse_row("mcl_okd:tau=0.07,bank_scoring=dense") == ("mcl_okd", {"tau": 0.07, "bank_scoring": "dense"})
    with pytest.raises(ConfigError):
        bench.parse_row("no_such_method")
    with pytest.raises(ConfigError, match="no table"):
        bench.settings_from_args(bench.parse_args(["--preset", "gpu", "--tables", "gpu_nothing"]))
    with pytest.raises(ConfigError, match="steps"):
        bench.settings_from_args(bench.parse_args(["--steps", "0"]))
    tables = bench.settings_from_args(bench.parse_args(["--preset", "gpu", "--device", "cuda"]))
    assert tables[0].name == "gpu_eager_fp32_b64" and not tables[0].compile  # eager tables first
    assert tables[1].batch_size == 64 and tables[2].batch_size == 256 and tables[1].compile == "reduce-overhead"
    headline = [t.name for t in bench.preset("gpu_headline", "cuda")]
    assert headline == ["gpu_independent_loop_b256", "gpu_independent_fused_b256", "gpu_paper_batch64", "gpu_batch256"]
    assert not bench.parse_args([]).omp_passive and bench.parse_args(["--omp-passive"]).omp_passive
    default = bench.settings_from_args(bench.parse_args(["--device", "cpu"]))[0]
    assert (default.backbone, default.peers, default.topology, default.batch_size) == ("resnet32", 4, "shared_trunk", 64)
