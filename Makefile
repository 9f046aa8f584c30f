# Set-up and everyday commands. `make install` pins torch/torchvision to the wheels on disk.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?= $(or $(MCL_DATA_ROOT),../shared/data)

.PHONY: install test test-all train benchmark reproduce-gpu clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"

test:
	MCL_DATA_ROOT=$(DATA_ROOT) $(PY) -m pytest -m "not slow" -q

test-all:
	MCL_DATA_ROOT=$(DATA_ROOT) $(PY) -m pytest -q

train:
	$(PY) -m mcl_lightning.train peers=4 backbone=resnet56 data.root=$(DATA_ROOT)

benchmark:
	$(PY) benchmarks/throughput.py --data-root $(DATA_ROOT)

# The paper's ResNet-32 x 4 MCL-OKD recipe on one GPU, as many epochs as fit in 8 minutes.
reproduce-gpu:
	$(PY) -m mcl_lightning.reproduce --minutes 8 data.root=$(DATA_ROOT)

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache build dist
