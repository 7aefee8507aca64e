# `make demo` and `make test` do all the set-up: they create .venv (if missing), install vimtr with its
# test extras into it at the versions constraints.txt pins, compile its CPU kernels once (`vimtr warmup`),
# then run the main job / the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(VENV)/bin/vimtr warmup  # compiles the CPU kernels into numba's disk cache (~15 s), once
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vimtr demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
