# moekit developer commands. `make test` installs what it needs from this repository's own files.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench demo clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; pin it first so nothing pulls a CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser
	$(VPY) -m pytest -q -x --durations=15

# Headless Chromium for tests/test_report_browser.py (which skips without it). Installed with apt-get only when it is
# missing and we are root; never fails the build, but says why it did not install.
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" != 0 ]; then echo "chromium is not installed and this is not root: the browser test will be skipped"; \
	elif ! command -v apt-get >/dev/null 2>&1; then echo "chromium is not installed and there is no apt-get: the browser test will be skipped"; \
	else echo "installing chromium for the browser test (apt-get install -y chromium)"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) || \
	  echo "apt-get could not install chromium (offline?): the browser test will be skipped"; fi

bench: $(STAMP)
	$(VPY) benchmarks/bench_layer.py

demo: $(STAMP)
	$(VENV)/bin/moekit compare --preset tiny --overwrite

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
