# Two entry points: `make demo` and `make test`; both bootstrap .venv from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test results-check clean fashion-mnist

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --editable '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-runtime demo --out runs/demo

test: $(STAMP) fashion-mnist
	$(PY) -m pytest -q

# Fashion-MNIST comes from Debian's package registry; installed when missing and we may use apt.
fashion-mnist:
	@test -d $(FASHION_MNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo "note: $(FASHION_MNIST) missing; run 'apt-get install dataset-fashion-mnist' for its tests"

results-check:
	$(PYTHON) ../shared/tools/check_results.py benchmarks/results

clean:
	rm -rf $(VENV) runs .cache .pytest_cache
