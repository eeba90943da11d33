# The README's two commands: `make demo` and `make test`. Each does its own set-up on a fresh clone.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# A CPU build of torch is enough for everything here; override to pick another build.
TORCH_SPEC ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: demo test test-all lint format quickstart bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $(STAMP)

# The linter and the type checker: the `dev` extra, installed on top of the test set-up.
DEV_STAMP := $(VENV)/.installed-dev
$(DEV_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[test,plot,dev]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(PY) -m lora.finetune

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint rules in pyproject.toml) and mypy on the typed core ([tool.mypy] files).
lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Rewrites files in place: `ruff format` then the auto-fixable lint rules.
format: $(DEV_STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# Every benchmark; writes benchmarks/results/{results.md,results.json,ratios.png}. BENCH_ARGS=--full
# adds full-size Phi-3-mini (minutes); BENCH_ARGS=--quick is a ~5-minute subset.
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
