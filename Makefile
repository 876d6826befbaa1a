# `make test`: the one test command (README and .ci/run both call it).
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest-xdist workers, whole test files each (module fixtures stay together). Two for CI's two cores: most
# tests spend their time waiting on agent processes, servers and sockets.
WORKERS ?= 2
# Nothing may need more than Python 3.10 (JetPack 6's): vermin for modules and members, ruff (py310) for syntax.
VERMIN := $(VENV)/bin/vermin --target=3.10- --violations --no-tips --eval-annotations agent engines tests

.PHONY: venv test lint
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $@

# The tests in two parts sharing one prepared-model cache: in parallel, then the live page's tests with their
# frame-rate check (marker `serial`) alone.
test: venv
	bash tests/setup_system.sh
	$(PY) -m ruff check agent engines tests
	$(VERMIN)
	$(VENV)/bin/lint-imports
	BESTSHOT_CACHE=$$(mktemp -d) && export BESTSHOT_CACHE && \
	  $(PY) -m pytest -q -n $(WORKERS) --dist loadfile --durations=15 -m 'not serial' tests && \
	  $(PY) -m pytest -q -m serial tests; rc=$$?; rm -rf "$$BESTSHOT_CACHE"; exit $$rc

lint: venv
	$(PY) -m ruff check agent engines tests
	$(VERMIN)
	$(VENV)/bin/lint-imports
