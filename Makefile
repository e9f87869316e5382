# Two set-up commands (see README): `make example` and `make test`. Both work offline given PyPI.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch first: a bare `torch` requirement would fetch a CUDA build of several GB.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot,xarray,hf,s3]'
	touch $@

install: $(VENV)/.installed

example: install
	$(VENV)/bin/kdcache run pipelines/mnist_hinton.yaml --quick

test: install
	$(VENV)/bin/ruff check kdcache tests
	$(PY) -m pytest -q

.PHONY: install example test
