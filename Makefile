# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
# Tested versions (pip -c): a release elsewhere cannot change what CI installs. `make constraints` refreshes them.
CONSTRAINTS ?= constraints/ci.txt
TORCH ?= torch==2.13.0
TF4 := .venv-tf4
LATEST := .venv-latest
# What the transformers 4.x venv runs: the code that follows transformers' signatures (patch, loading).
TF4_TESTS := tests/test_patch.py tests/test_loading.py tests/test_versions.py tests/test_arch_distilbert.py tests/test_arch_roberta.py

.PHONY: setup demo test test-fast test-tf4 bench-smoke test-latest test-cpp test-aarch64 check-aarch64-syntax cross-tools constraints check-kernels check-kernels-full bench perf gpu-check clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on a CPU machine that is the CPU wheel, and it satisfies pyproject's range, so nothing
# later pulls a multi-GB CUDA build. --no-build-isolation builds the C++ extension against that same torch.
$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(CONSTRAINTS) --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c $(CONSTRAINTS) $(TORCH) ninja
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-build-isolation -e ".[test,bench]"
	touch $@

# The other transformers major (4.x), same torch, patch and loading tests only. No C++ build here
# (FASTDISTIL_NO_EXT=1): the editable install imports the fastdistil/_C*.so that `setup` built in place against
# the same torch, so the native backend runs in both venvs.
$(TF4)/.installed: pyproject.toml setup.py constraints/transformers4.txt | setup
	$(PY) -m venv $(TF4)
	$(TF4)/bin/pip install -q -c constraints/transformers4.txt --upgrade pip setuptools wheel
	$(TF4)/bin/pip install -q -c constraints/transformers4.txt $(TORCH)
	FASTDISTIL_NO_EXT=1 $(TF4)/bin/pip install -q -c constraints/transformers4.txt --no-build-isolation -e ".[test]"
	touch $@

test-tf4: $(TF4)/.installed
	$(TF4)/bin/python -m pytest -q -p no:randomly $(TF4_TESTS)

# The whole suite against the newest releases of everything but torch (a fresh venv, no constraints): run it to
# see whether a refresh of the pins is safe. The C++ extension is rebuilt in place against the same torch.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip setuptools wheel
	$(LATEST)/bin/pip install -q $(TORCH)
	$(LATEST)/bin/pip install -q --upgrade --no-build-isolation -e ".[test,bench]"
	$(LATEST)/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|triton|sentence-transformers|tokenizers) '
	$(LATEST)/bin/python -m pytest -q -p no:randomly tests

# Rewrite the pins with what a fresh resolve picks today (nothing is installed); then run `make test test-tf4`.
# Any venv's pip does the resolving: an existing .venv is used as it is (no C++ rebuild first).
constraints:
	test -x $(BIN)/python || $(MAKE) setup
	$(BIN)/python constraints/refresh.py constraints/ci.txt $(TORCH) -e ".[test,bench]"
	$(BIN)/python constraints/refresh.py constraints/transformers4.txt $(TORCH) "transformers<5" -e ".[test]"

demo: setup
	$(BIN)/fastdistil demo

test: setup
	$(BIN)/python -m pytest -q -p no:randomly tests

# The torch-free C++ kernels (csrc/kernels/*.h) against float64 references, no torch, no Python: test-cpp natively
# (every kernel table this CPU runs), test-aarch64 cross-compiled for aarch64 (the portable table; GCC lowers its
# 128-bit vectors to NEON) and run under qemu-user. test-aarch64 needs Debian's g++-aarch64-linux-gnu and qemu-user:
# `make cross-tools` installs them (root).
CXX ?= g++
CXX_KERNELS := -O2 -std=c++17 -fopenmp-simd -fno-trapping-math -Wall -Wno-psabi
KERNEL_SRCS := $(wildcard csrc/kernels/*.h) csrc/kernels_generic.cpp tests/cpp/test_kernels.cpp
build/test_kernels: $(KERNEL_SRCS) csrc/kernels_avx2.cpp csrc/kernels_avx512.cpp
	mkdir -p build
	$(CXX) $(CXX_KERNELS) -o $@ tests/cpp/test_kernels.cpp csrc/kernels_generic.cpp csrc/kernels_avx2.cpp \
		csrc/kernels_avx512.cpp

test-cpp: build/test_kernels
	build/test_kernels

build/test_kernels_aarch64: $(KERNEL_SRCS)
	mkdir -p build
	aarch64-linux-gnu-g++ $(CXX_KERNELS) -static -o $@ tests/cpp/test_kernels.cpp csrc/kernels_generic.cpp

test-aarch64: build/test_kernels_aarch64
	qemu-aarch64 build/test_kernels_aarch64

# Every csrc/*.cpp (the torch-facing ones too) through the aarch64 compiler against this venv's torch headers, no
# linking (no aarch64 libtorch here): ~5 min on 2 cores, not in CI.
check-aarch64-syntax: setup
	for f in csrc/*.cpp; do aarch64-linux-gnu-g++ -std=c++17 -fsyntax-only -fopenmp -Wno-psabi \
		$$($(BIN)/python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))") \
		-I$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['include'])") -DTORCH_EXTENSION_NAME=_C $$f \
		|| exit 1; done

cross-tools:
	command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
		apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user

# CI builds every configuration for sm_80 and sm_90 with the divisibility hints aligned tensors get (what BERT
# widths launch; ~1,000 builds, ~4.5 min on 2 cores); check-kernels-full adds the variants without hints (~2,000
# builds, ~9 min): run it when kernels or their configurations change.
CK_JOBS ?= 2
check-kernels: setup
	$(BIN)/fastdistil check-kernels --arch 80,90 --align aligned --jobs $(CK_JOBS)

check-kernels-full: setup
	$(BIN)/fastdistil check-kernels --arch 80,90 --align aligned,unaligned --jobs $(CK_JOBS)

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

# Every benchmark's engines run once and are checked against transformers, nothing timed (~6 min on 2 cores).
bench-smoke: setup
	$(BIN)/python -m pytest -q -p no:randomly benchmarks --benchmark-disable

# On a GPU machine (CUDA torch + triton installed, no internet needed): installs this checkout into $(PY) (the
# system python3, not the venv; no downloads, no C++ build), then the CUDA test suite, `fastdistil bench --device
# cuda`, model-perf and a kernel profile, each under its own time limit within BUDGET seconds (fastdistil/gpucheck.py).
# OUT=dir (default out/gpu-check-<date>), TAR=file.tgz (default OUT.tgz), ARGS=more options
# (e.g. ARGS="--tests-limit 90"). Exits 2 at once without CUDA.
# DRY=1: the same logic on the CPU in the venv (Triton interpreter, tiny shapes): what CI runs.
BUDGET ?= 420
ifdef DRY
gpu-check: setup
	$(BIN)/python -m fastdistil.gpucheck --dry-run --budget $(BUDGET) $(if $(OUT),--out $(OUT)) $(if $(TAR),--tar $(TAR))
else
gpu-check:
	$(PY) -m fastdistil.gpucheck --install --budget $(BUDGET) $(if $(OUT),--out $(OUT)) $(if $(TAR),--tar $(TAR)) $(ARGS)
endif

clean:
	rm -rf $(VENV) $(TF4) $(LATEST) build *.egg-info fastdistil/_C*.so
