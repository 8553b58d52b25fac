# Two commands on a fresh machine:  `make bench` (installs, runs the benchmark)  and  `make test` (installs, runs the tests).
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch first, pinned: a CPU build of 2.13.0 lies on the development/CI machines' disk; letting pip resolve a
# newer torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast bench gpu-check gpu-carry compile-check triton-check clean

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

# Triton runs on the CPU through its interpreter; it must be switched on before triton is imported.
# PYTEST_WORKERS: pytest-xdist workers (one per core, at most 4: each holds torch and the interpreter in memory);
# 0 runs in this process. Every test is cut off at 15 minutes (pytest-timeout, pyproject.toml) rather than hang CI.
PYTEST_WORKERS ?= auto --maxprocesses 4
test: install
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) tests

# For development: everything but the tests marked slow (the GPU compile checks of every Triton kernel, under two
# triton versions). CI runs `make test`.
test-fast: install
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) -m "not slow" tests

# BENCH_ARGS: options of `python -m vera_kernels.bench`, e.g. make bench BENCH_ARGS="--quick --plot bench.png"
BENCH_ARGS ?=
bench: install
	$(VPY) -m vera_kernels.bench $(BENCH_ARGS)

# On a GPU machine (system python with torch/triton/transformers/peft): every kernel against the reference in
# bf16/fp16/fp32, then the benchmark table. Under 6 minutes on one H100.
gpu-check:
	$(PY) bench/gpu_check.py

# A trimmed bitsandbytes (CUDA 13 libraries only) in .gpu_carry/site for the GPU image, which has none: carried to the
# device (carry [".gpu_carry"]), it lets gpu-check time the CUDA dequantization against bitsandbytes'.
gpu-carry: install
	$(VPY) bench/gpu_carry.py

compile-check:
	bash csrc/compile_check.sh

# Every Triton kernel compiled for sm_80/sm_90 with no GPU; registers, spills, shared memory (make test runs it too,
# also under the GPU image's triton). TRITON=3.6.0 checks another triton version, installed next to the venv.
TRITON ?=
triton-check: install
	$(VPY) tests/triton_compile_check.py --fail-on-spills 90 $(if $(TRITON),--triton $(TRITON))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
