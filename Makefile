# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
# Triton for the kernels' tests, which run in Triton's interpreter without a GPU;
# its 3.6 interpreter needs numpy < 2.4. On a CUDA machine keep torch's own
# triton: make test-gpu TORCH=torch TRITON=
TRITON ?= "triton==3.6.0" "numpy<2.4"
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# What `make demo` needs: torch and moekit, without the dev tools and Triton.
RUN_STAMP := $(VENV)/.installed-run

.PHONY: demo test test-all test-gpu bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q -e ".[dev]"
	$(if $(strip $(TRITON)),$(PY) -m pip install -q $(TRITON))
	touch $(STAMP)

demo: $(RUN_STAMP)
	$(VENV)/bin/moekit demo --threads 1

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu"

# On a machine with a CUDA device: every compute path on the GPU against the loop reference.
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

bench: $(STAMP)
	$(PY) benchmarks/perf.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
