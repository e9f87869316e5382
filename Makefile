# Two set-up commands (see README): `make example` and `make test`. Both work offline given PyPI.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch and torchvision as a matched pair first (the vision extra's timm would otherwise pull
	# whatever torchvision PyPI has, which does not load beside this torch).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,plot,xarray,hf,s3,vision]'
	touch $@

install: $(VENV)/.installed

example: install
	$(VENV)/bin/kdcache run pipelines/mnist_hinton.yaml --quick

test: install
	$(VENV)/bin/ruff check kdcache tests
	$(PY) -m pytest -q

.PHONY: install example test
