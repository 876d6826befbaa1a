# `make test`: the one test command (README and .ci/run both call it).
VENV ?= .venv
PY := $(VENV)/bin/python
# Nothing may need more than Python 3.10 (JetPack 6's): vermin for modules and members, ruff (py310) for syntax.
VERMIN := $(VENV)/bin/vermin --target=3.10- --violations --no-tips --eval-annotations agent engines tests

.PHONY: venv test lint
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $@

test: venv
	bash tests/setup_system.sh
	$(PY) -m ruff check agent engines tests
	$(VERMIN)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

lint: venv
	$(PY) -m ruff check agent engines tests
	$(VERMIN)
	$(VENV)/bin/lint-imports
