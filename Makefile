# Two commands do all set-up on a fresh machine (see README):
#   make report   # the main job: the notebook chain on the embedded default model (into outputs/runs/<settings>/)
#   make test     # the test suite (fast tests; `make test-slow` adds the slow ones)
# Both create/update the virtual environment in .venv first. `make lab` opens the notebooks in JupyterLab to
# explore them (the widgets of 01 and 03).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dgq-installed

.PHONY: env test test-slow report report-quick publish lab demo bench clean

env: $(STAMP)

# torch and torchvision first, pinned, on their own line: on the project's machines they come from local disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

report: $(STAMP)
	$(PY) -m dgq_utils.report $(ARGS)

report-quick: $(STAMP)
	$(PY) -m dgq_utils.report --quick $(ARGS)

# make one run folder the committed figures/ and results/ (results/RUN.json says which): make publish RUN=outputs/runs/...
publish: $(STAMP)
	$(PY) -m dgq_utils.report.publish $(RUN) $(ARGS)

# JupyterLab on the notebooks folder (the venv's kernel; extra options via ARGS, e.g. ARGS=--no-browser)
lab: $(STAMP)
	$(PY) -m jupyterlab --ServerApp.root_dir=notebooks $(ARGS)

demo: $(STAMP)
	$(PY) -m dgq_utils.demo

bench: $(STAMP)
	$(PY) benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) outputs
