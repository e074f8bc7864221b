# Two entry points: `make demo` and `make test`; both bootstrap .venv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test results-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --editable '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-runtime demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

results-check:
	$(PYTHON) ../shared/tools/check_results.py benchmarks/results

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
