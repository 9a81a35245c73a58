# moekit developer commands. `make test` installs what it needs from this repository's own files.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 lies on this machine's disk; pin it first so nothing pulls a CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q -x --durations=15

bench: $(STAMP)
	$(VPY) benchmarks/bench_layer.py

demo: $(STAMP)
	$(VENV)/bin/moekit compare --preset tiny

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
