# Set-up and everyday commands. `make install` pins torch/torchvision to the wheels on disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= $(or $(MCL_DATA_ROOT),../shared/data)
# OpenMP threads busy-wait by default; on a shared machine that makes small CPU ops 5-20x slower.
OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test test-all train bench bench-gpu benchmark reproduce-gpu proxy-study proxy-report clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"

test:
	MCL_DATA_ROOT=$(DATA_ROOT) OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PY) -m pytest -m "not slow" -q

test-all:
	MCL_DATA_ROOT=$(DATA_ROOT) OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PY) -m pytest -q

train:
	$(PY) -m mcl_lightning.train peers=4 backbone=resnet56 data.root=$(DATA_ROOT)

# Throughput of every method and the data path against the plain cross-entropy floor, in one
# run (python -m mcl_lightning.bench; docs/benchmarks.md). Under 5 minutes on 2 CPU cores.
bench:
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PY) -m mcl_lightning.bench --data-root $(DATA_ROOT) --json outputs/bench/cpu.json

# The whole GPU table (paper batch, batch 256, fused vs looped peers, eager baseline) in under
# 5 minutes; commit its JSON and the card's name into docs/benchmarks.md.
bench-gpu:
	$(PY) -m mcl_lightning.bench --preset gpu --device cuda --data-root $(DATA_ROOT) --json outputs/bench/gpu.json

benchmark: bench

# The paper's ResNet-32 x 4 MCL-OKD recipe on one GPU, as many epochs as fit in 8 minutes.
reproduce-gpu:
	$(PY) -m mcl_lightning.reproduce --minutes 8 data.root=$(DATA_ROOT)

# The CPU proxy study (docs/results.md): 7 variants x 3 seeds of ResNet-8 x 4 on full CIFAR-100, two
# one-thread runs at a time (about 2 hours on 2 cores); relaunching skips finished runs.
proxy-study:
	PY=$(PY) DATA_ROOT=$(DATA_ROOT) docs/results/run_proxy_study.sh

proxy-report:
	$(PY) -m mcl_lightning.report docs/results/proxy --out docs/results/proxy_report

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache build dist
