# imgresume — `make demo` runs a local cluster with a real failover upload,
# `make test` runs the whole suite. Both build .venv themselves.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow venv clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat mode keeps the drop-in twistd plugins visible to twistd
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m imgresume.demo

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest tests --run-slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .pytest_cache demo-run
