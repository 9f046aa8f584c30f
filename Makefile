# Set-up and everyday commands. `make install` pins torch/torchvision to the wheels on disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= $(or $(MCL_DATA_ROOT),../shared/data)
# OpenMP threads busy-wait by default; on a shared machine that makes small CPU ops 5-20x slower.
OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test test-all test-oldest docs train bench bench-gpu benchmark reproduce-gpu gpu-evidence proxy-study proxy-report clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"

# Tests run in TEST_WORKERS processes (pytest-xdist): most of the suite is CLI runs, each a process
# that spends its first seconds importing torch + Lightning on one core. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test:
	MCL_DATA_ROOT=$(DATA_ROOT) OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadgroup

test-all:
	MCL_DATA_ROOT=$(DATA_ROOT) OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The documentation site (mkdocs.yml, docs/) into build/site; --strict fails on a broken link or anchor, or a
# `:::` API reference that does not resolve. `python -m http.server -d build/site` serves it.
docs:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site

# The oldest versions pyproject.toml allows (its lower bounds), in their own environment: the unit tests
# and one short run of each entry point (tests/test_entry_points.py). Downloads about 4 GB once (torch).
OLDEST_VENV ?= .venv-oldest
OLDEST = torch==2.11.0 torchvision==0.26.0 lightning==2.6.6 torchmetrics==1.9.0 hydra-core==1.3.2 omegaconf==2.3.0 \
	hydra-joblib-launcher==1.2.0
UNIT_TESTS = tests/test_entry_points.py tests/test_gpu_evidence.py tests/test_study.py tests/test_contrast.py tests/test_models.py \
	tests/test_system.py tests/test_rng.py tests/test_samplers.py tests/test_fused_contrast.py tests/test_fused_peers.py \
	tests/test_perf.py tests/test_resident_data.py tests/test_data.py tests/test_backbones.py
test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST) -e . pytest pytest-xdist
	$(OLDEST_VENV)/bin/python -m pip check
	MCL_DATA_ROOT=$(DATA_ROOT) OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(OLDEST_VENV)/bin/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadgroup $(UNIT_TESTS)

train:
	$(PY) -m mcl_lightning.train peers=4 backbone=resnet56 data.root=$(DATA_ROOT)

# Throughput of every method and the data path against the plain cross-entropy floor, in one
# run (python -m mcl_lightning.bench; docs/benchmarks.md). Under 5 minutes on 2 CPU cores. It runs
# in the threading environment training runs in: no OMP_WAIT_POLICY here (add --omp-passive on a busy machine).
bench:
	$(PY) -m mcl_lightning.bench --data-root $(DATA_ROOT) --json outputs/bench/cpu.json

# The whole GPU table (paper batch, batch 256, fused vs looped peers, eager baseline) in under
# 5 minutes; commit its JSON and the card's name into docs/benchmarks.md.
bench-gpu:
	$(PY) -m mcl_lightning.bench --preset gpu --device cuda --data-root $(DATA_ROOT) --json outputs/bench/gpu.json

benchmark: bench

# Extra data options for the GPU commands, e.g. DATA_OPTS=data.check_integrity=false for a re-encoded copy.
DATA_OPTS ?=
EVIDENCE ?= outputs/gpu-evidence
GPU_EVIDENCE_ARGS ?=

# The paper's ResNet-32 row (MCL-OKD, DML, baseline; seeds 0 and 1) as concurrent runs on one GPU, as
# many epochs as fit in 8 minutes (python -m mcl_lightning.reproduce; docs/results.md).
reproduce-gpu:
	$(PY) -m mcl_lightning.reproduce --minutes 8 data.root=$(DATA_ROOT) $(DATA_OPTS)

# One command for a GPU lease (at most 9 minutes, no network, works with PY=python3 and no .venv): the
# benchmark's headline rows (at most 2.5 minutes), then the study; everything in $(EVIDENCE).
gpu-evidence:
	$(PY) -m mcl_lightning.gpu_evidence --out $(EVIDENCE) $(GPU_EVIDENCE_ARGS) data.root=$(DATA_ROOT) $(DATA_OPTS)

# The CPU proxy study (docs/results.md): 7 variants x 3 seeds of ResNet-8 x 4 on full CIFAR-100, two
# one-thread runs at a time (about 2 hours on 2 cores); relaunching skips finished runs.
proxy-study:
	PY=$(PY) DATA_ROOT=$(DATA_ROOT) docs/results/run_proxy_study.sh

proxy-report:
	$(PY) -m mcl_lightning.report docs/results/proxy --out docs/results/proxy_report

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache build dist
