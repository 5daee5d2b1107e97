# radserve: `make serve` and `make test` are all a newcomer needs (both create .venv on first use).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
DEVICE ?= auto

TRITON_VENV ?= .venv-triton
TRITON_REPO ?= out/triton-repository
TRITON_PORT ?= 8001

.PHONY: venv serve test test-unit test-fast lint format proto demo bench train clean venv-triton triton-export triton-serve
.PHONY: demo-archive

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The local Triton Inference Server's own environment (nvidia-pytriton needs numpy < 2; radserve has numpy 2).
$(TRITON_VENV)/.radserve-installed: inference/triton/requirements.txt | venv
	$(VENV)/bin/radserve triton venv --venv $(TRITON_VENV)

venv-triton: $(TRITON_VENV)/.radserve-installed  ## Triton's environment (nvidia-pytriton, CPU torch): about 4 minutes

triton-export: venv  ## the Triton model repository of models/ for NVIDIA's Triton container (libtorch, GPU)
	$(VENV)/bin/radserve triton export --out $(TRITON_REPO) --models models

triton-serve: venv venv-triton  ## a local Triton on models/ (gRPC $(TRITON_PORT)); then `radserve serve --backend triton`
	$(VENV)/bin/radserve triton serve --models models --venv $(TRITON_VENV) --grpc-port $(TRITON_PORT)

serve: venv  ## start the server on $(HOST):$(PORT) with the bundled models on the best device
	$(VENV)/bin/radserve serve --host $(HOST) --port $(PORT) --models models --device $(DEVICE)

test: venv venv-triton  ## the whole test suite (GPU tests skip without CUDA; Triton tests use .venv-triton)
	$(PY) -m pytest -q -ra

test-unit: venv  ## the tests that start no server and train nothing (under 2 minutes on 2 cores)
	$(PY) -m pytest -q -ra -m "not server and not slow"

test-fast: venv  ## everything but the tests marked slow
	$(PY) -m pytest -q -ra -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

proto: venv  ## regenerate inference/api/gen from proto/ (tests/api/test_stubs.py fails when stale)
	$(PY) tools/gen_proto.py

demo: venv  ## read a synthetic chest CT through a running server (start one with `make serve`)
	$(VENV)/bin/radserve demo --server $(HOST):$(PORT)

bench: venv  ## the quick CPU benchmark (< 5 min on 2 cores): real server vs direct and naive; JSON in runs/bench/
	$(PY) -m benchmarks.run --profile quick --device cpu --out runs/bench

MODELS_TRAINED ?= lung_nodule_ct brain_lesion_mr chest_xray
MODEL ?= $(MODELS_TRAINED)
train: venv  ## retrain the bundled models from their seeded scripts, every version (MODEL=name for one)
	for m in $(MODEL); do for v in models/$$m/*/model.yaml; do \
		$(PY) models/$$m/train.py --out $$(dirname $$v) || exit 1; done; done

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

demo-archive: venv  ## Orthanc (DICOMweb) + radserve + `radserve bridge`: a synthetic CT stored, its SR and SEG appear beside it
	$(PY) tools/demo_archive.py
