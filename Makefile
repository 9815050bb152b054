# The two set-up commands named in README.md: `make demo` and `make test`.
# Each creates (or reuses) a project-local virtual environment in $(VENV), installs a
# CPU build of torch 2.13.0 first when no CUDA GPU is present (an unpinned torch pulls
# gigabytes of CUDA packages), then installs this package with its extras at the versions
# tested, pinned in constraints.txt (pyproject keeps lower bounds for users), then runs.
# Regenerate constraints.txt with `make constraints` after a tested upgrade.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.frontier-installed
OUT ?= outputs/demo

.PHONY: demo test test-slow lint env clean constraints

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing the default torch build"; \
		$(PY) -m pip install -q "torch>=2.4"; \
	else \
		echo "No CUDA GPU: installing CPU torch 2.13.0 first"; \
		$(PY) -m pip install -q "torch==2.13.0"; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,gguf,eval]"
	@touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check frontier_trainer tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

demo: $(STAMP)
	$(PY) -m frontier_trainer.demo --output-dir $(OUT)

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .hypothesis
