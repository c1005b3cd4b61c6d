# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test test-fast check-kernels bench perf clean

setup: $(VENV)/.installed

# torch==2.13.0 first: on a CPU machine that is the CPU wheel, and it satisfies pyproject's range, so nothing
# later pulls a multi-GB CUDA build. --no-build-isolation builds the C++ extension against that same torch.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

demo: setup
	$(BIN)/fastdistil demo

test: setup
	$(BIN)/python -m pytest -q -p no:randomly tests

check-kernels: setup
	$(BIN)/fastdistil check-kernels --arch 80,90

bench: setup
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info fastdistil/_C*.so
