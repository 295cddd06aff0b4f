# imgresume — `make demo` runs a local cluster with a real failover upload,
# `make test` runs the whole suite. Both build .venv themselves.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-sharedfs sharedfs-up sharedfs-down test-cephfs ceph-up ceph-down bench venv clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compat mode keeps the drop-in twistd plugins visible to twistd
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	# the coverage-guided fuzzer is optional: its tests skip (or fail in CI) without it
	$(PY) -m pip install --quiet atheris || echo "atheris unavailable: atheris fuzz runs will be skipped"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m imgresume.demo

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest tests --run-slow $(PYTEST_ARGS)

# The shared-filesystem tests on a local GlusterFS volume mounted three times
# (needs root and /dev/fuse; docs/sharedfs.md).  `make test` runs them too
# when the volume is up, and skips them loudly when it is not.
sharedfs-up:
	bash .ci/glusterfs.sh up

sharedfs-down:
	bash .ci/glusterfs.sh down

ceph-up:
	bash .ci/ceph.sh up

ceph-down:
	bash .ci/ceph.sh down

test-cephfs: $(STAMP)
	IMGRESUME_REQUIRE_CEPH=1 $(PY) -m pytest tests/system/test_cephfs.py $(PYTEST_ARGS)

test-sharedfs: $(STAMP)
	IMGRESUME_REQUIRE_SHAREDFS=1 $(PY) -m pytest tests/system/test_gluster.py $(PYTEST_ARGS)

# Benchmarks (docs/benchmarks.md): figures as ratios against baselines
# measured in the same run; BENCH_ARGS=--quick for a short run.
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp .pytest_cache demo-run
