# lorapipe: `make demo` (the main job) and `make test` (the suite) do all set-up themselves.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
TORCH_VER ?= 2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo lint test test-unit test-integration bench clean

install: $(STAMP)

# torch goes in first: an unpinned torch pulled in by another package would be a multi-GB CUDA
# build. Where a CUDA driver is present the default (CUDA) wheel is what we want instead.
# deepspeed compiles against the installed torch, so it is built without isolation. On CPU its
# communication backend loads a shared-memory op at every start: built here (at install time),
# else the first training run would JIT-compile it before its first step (and need a C++
# compiler at run time). --no-cache-dir: a cached wheel built without the op would win.
# Every install is held to constraints.txt, the pins the training image uses too (TORCH_VER
# must equal its torch pin; tests/unit/test_infra.py checks).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q -c constraints.txt torch && \
	  DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt --no-build-isolation deepspeed; \
	else \
	  $(BIN)/pip install -q -c constraints.txt torch==$(TORCH_VER) && \
	  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(BIN)/pip install -q -c constraints.txt --no-build-isolation --no-cache-dir deepspeed; \
	fi
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lorapipe demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Lint first: a ruff failure fails the suite.
test: lint
	$(BIN)/python -m pytest -q -ra tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests/integration

bench: $(STAMP)
	$(BIN)/python bench/run_cpu.py

clean:
	rm -rf $(VENV) .demo runs mlruns mlflow.db
