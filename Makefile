# One-command set-up and runs. `make demo` is the main job, `make test` the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.l1fx-installed
# pip's own noise on this kind of machine (index folders without the package) is filtered out of the
# set-up output; pipefail keeps pip's exit status.
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c
QUIET_PIP   := 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }

.PHONY: venv demo test bench test-gpu bench-gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	$(PY) -m pip install -q torch==2.13.0 $(QUIET_PIP)
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[all]' $(QUIET_PIP)
	@# Optional: onnxruntime's C headers (Debian's libonnxruntime-dev) for the native custom-op library.
	@$(PY) -m l1fx.kernels.ort_build --fetch-headers \
	  || echo "note: without onnxruntime headers l1fx.ort_session uses the Python-op path"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m l1fx.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/bench_ops.py --backward
	$(PY) bench/bench_cpu.py

# On a CUDA machine (with a CUDA build of torch in the venv).
test-gpu: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_triton.py

bench-gpu: $(STAMP)
	$(PY) bench/bench_gpu.py --backward --markdown bench/RESULTS-gpu.md

clean:
	rm -rf $(VENV) build *.egg-info out
