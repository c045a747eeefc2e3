# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test bench lint clean chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch first; an unpinned torch would pull several GB of CUDA packages
	$(PIP) "torch==2.13.0"
	$(PIP) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/taoflow demo

# the dashboard's browser test drives Debian's chromium, headless
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q chromium || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }; }

test: $(STAMP) chromium
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) bench/emit.py
	$(PY) bench/stream.py
	$(PY) bench/tao.py
	$(PY) bench/gateway.py
	$(PY) bench/views.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy taoflow schemas

clean:
	rm -rf $(VENV) .taoflow .pytest_cache
