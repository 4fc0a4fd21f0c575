# safeclip: `make help` lists the targets.
.DEFAULT_GOAL := help
.PHONY: help install test test-fast smoke-wheel lint engine triton-repo bench bench-quick gpu-check clean-engines

# An activated virtual environment is used as it is; otherwise `make install` creates .venv.
VENV       ?= $(or $(VIRTUAL_ENV),.venv)
PY         := $(VENV)/bin/python
TRITON_VENV ?= .venv-triton
LITELLM_VENV ?= .venv-litellm
# Where the checks' output goes (bench-quick, gpu-check): git-ignored, so running them leaves the tree clean.
# `make bench` writes bench/results/, the record the README quotes; copy a run from here to keep it.
RUNS       ?= bench/runs
# The LiteLLM version the guardrail endpoint was read from and is tested against (tests/test_litellm.py).
LITELLM_PIN ?= litellm[proxy]==1.106.12
# The last anthropic SDK line that sends its key as X-Api-Key (2.x sends Bearer); tests/test_forwarding.py
# runs it as a client from its own venv, beside the 2.x in VENV.
ANTHROPIC1_VENV ?= .venv-anthropic1
ANTHROPIC1_PIN ?= anthropic==1.17.0
MODEL      ?= openai/clip-vit-large-patch14-336
PRECISION  ?= fp32,fp16
CLS        ?= final
DESCRIPTORS ?=
# torch 2.13.0 is the CPU wheel on our machines; a bare `torch` would pull a multi-GB CUDA build.
TORCH_PIN  ?= torch==2.13.0
# The TensorRT and cuda-python bindings of each supported major, unpacked beside the venv (never on its
# path: two TensorRT majors cannot share one) for tests/test_gpu_api.py, which checks every attribute the
# code uses without a GPU. ~70 MB from the registry; the wheels import without CUDA or TensorRT libraries.
GPU_BINDINGS ?= $(VENV)/gpu-bindings
TRT_BINDINGS ?= tensorrt10=tensorrt-cu13-bindings==10.16.1.11 tensorrt11=tensorrt-cu13-bindings==11.4.0.106
CUDA_BINDINGS ?= cuda13=cuda-bindings==13.4.4 cuda12=cuda-bindings==12.9.10

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'
	@echo "  variables: MODEL=$(MODEL) NAME=<engine name> PRECISION=$(PRECISION) CLS=$(CLS) DESCRIPTORS=<toml> ONLY=<bench,...>"

$(PY):
	python3 -m venv $(VENV)

install: $(PY) ## install the runtime (CPU onnxruntime), the exporter and the test tools into VENV (default: the active venv, else .venv), plus .venv-triton, .venv-litellm and .venv-anthropic1
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	@# [cpu] is the CPU onnxruntime: the runtime's onnxruntime comes from exactly one of [cpu] or [gpu].
	@# [ray]: scan --ray and its tests on a local Ray (~25 s, ~120 MB; it includes [scan]'s pyarrow).
	@# setuptools prints one notice here ("Editable installation ... folders in your working directory with
	@# the same name as your package"): it does for every editable install of a package that spans several
	@# folders, as this src layout per stage does. No folder here shadows the package; the notice is all
	@# that is left of the build's warnings, and no setting turns it off short of another build backend.
	$(PY) -m pip install --quiet -e '.[cpu,export,serve,calibrate,dev,ray]'
	@for spec in $(TRT_BINDINGS); do \
		$(PY) -m pip install --quiet --no-deps --upgrade --target '$(GPU_BINDINGS)/'"$${spec%%=*}" "$${spec#*=}" || exit 1; \
	done
	@for spec in $(CUDA_BINDINGS); do \
		$(PY) -m pip install --quiet --no-deps --upgrade --target '$(GPU_BINDINGS)/'"$${spec%%=*}" "$${spec#*=}" cuda-pathfinder || exit 1; \
	done
	@# PyTriton bundles a CPU-capable Triton server for the tests but pins numpy<2: it gets its own venv.
	python3 -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet nvidia-pytriton==0.7.0 onnxruntime
	@# LiteLLM's proxy, for the guardrail end-to-end tests; its pins are its own, so it gets its own venv too.
	python3 -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet '$(LITELLM_PIN)'
	python3 -m venv $(ANTHROPIC1_VENV)
	$(ANTHROPIC1_VENV)/bin/pip install --quiet '$(ANTHROPIC1_PIN)'

test: ## run the test suite (CPU, tiny-random; no network, no GPU needed)
	SAFECLIP_TRITON_PYTHON='$(abspath $(TRITON_VENV))/bin/python' $(PY) -m pytest -q

test-fast: ## the tests not marked slow, fuzzing with 50 examples a test (5 min on 2 cores shared at load ~10)
	SAFECLIP_FUZZ_EXAMPLES=$${SAFECLIP_FUZZ_EXAMPLES:-50} SAFECLIP_TRITON_PYTHON='$(abspath $(TRITON_VENV))/bin/python' \
		$(PY) -m pytest -q -m 'not slow'

smoke-wheel: ## build the wheel, install it (not editable, no torch) in a fresh venv, run its CLI: --version, screen, serve (~1 min)
	tests/smoke_wheel.sh '$(abspath $(PY))'

lint: ## ruff (format and lint rules) and mypy (types), as configured in pyproject.toml; all run, any fails it
	@# `safeclip` is a regular package in runtime/, so mypy needs the parts in export/ and calibration/ named too.
	@status=0; \
	$(PY) -m ruff format --check . || status=1; \
	$(PY) -m ruff check . || status=1; \
	$(PY) -m mypy -p safeclip -p safeclip.export -p safeclip.calibration -p bench || status=1; \
	exit $$status

engine: ## build engines/NAME from MODEL: ONNX FP32+FP16, manifest, and a TensorRT plan where TensorRT and a GPU exist
ifndef NAME
	$(error NAME is required, e.g. `make engine NAME=llava15 MODEL=$(MODEL)` or `make engine NAME=tiny MODEL=tiny-random`)
endif
	$(PY) -m safeclip.export --model '$(MODEL)' --out 'engines/$(NAME)' --precision '$(PRECISION)' --cls '$(CLS)' \
		$(if $(DESCRIPTORS),--descriptors '$(DESCRIPTORS)')
	$(PY) -m safeclip.runtime.cli build-engine --engine 'engines/$(NAME)' --if-available

triton-repo: ## Triton model repository for engines/NAME in model_repository/
ifndef NAME
	$(error NAME is required, e.g. `make triton-repo NAME=llava15`)
endif
	$(PY) -m safeclip.runtime.cli export-triton --engine 'engines/$(NAME)' --out model_repository

bench: ## the nine benchmarks side by side (CPU, ~28 min on 2 cores + a few for the scan) -> bench/results/<date>.{json,md,png}
	$(PY) -m bench --out bench/results $(if $(ONLY),--only '$(ONLY)')

bench-quick: ## a short benchmark run (~5 min on 2 idle cores + a few for the scan, ViT-B/32 only) -> bench/runs/<date>-quick.* (git-ignored: a check, not a record)
	$(PY) -m bench --quick --out '$(RUNS)' $(if $(ONLY),--only '$(ONLY)')

gpu-check: ## on a CUDA GPU: plan and GPU providers vs ONNX Runtime CPU, torch FP16 timing (MODEL= optional) -> bench/runs/gpu-check.json; without one, says so
	$(PY) tests/gpu_check.py $(if $(filter command line environment,$(origin MODEL)),--model '$(MODEL)') \
		--out '$(or $(GPU_CHECK_OUT),$(RUNS)/gpu-check.json)'

clean-engines: ## delete everything under engines/
	find engines -mindepth 1 -not -name .gitkeep -delete
