# One virtual environment in the checkout; torch is installed first from its 2.13.0 CPU wheel so that
# no later requirement can pull a multi-GB CUDA build onto a CPU machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test lint bench gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/fedsvd run configs/default.toml

# Two workers: a federation's start-up (process launches, imports, Ray) leaves a core idle for much of its time,
# so two run side by side in about 1.5 times the time of one (see tests/conftest.py for what they share).
# --no-loadscope-reorder keeps the order tests/conftest.py gives: the longest work first.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=15

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Ratios measured side by side in one run each: DP step, server step, planning, client-level DP against
# dp-accounting, 1,000 clients against 10, and a simulated round against the same round in one plain process;
# then where the time to round 0 of the default federation goes.
bench: setup
	$(BIN)/python bench/dp_step.py
	$(BIN)/python bench/server_step.py
	$(BIN)/python bench/planning.py
	$(BIN)/python bench/accounting_gap.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/harness.py
	$(BIN)/python bench/startup.py

# CUDA step times, FedSVD's server step and clients sharing one GPU; one line and exit 0 without a GPU.
# No venv is made for it: on a GPU machine the CPU-only torch pinned above would replace the CUDA one, so it
# runs in the venv where there is one and else in $(PYTHON) with the project's dependencies on PYTHONPATH.
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bench/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
