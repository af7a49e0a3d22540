# Two commands for a fresh clone: `make demo` and `make test`. Each sets up .venv first (demo: numpy and tqdm only;
# test: also torch, transformers and the test tools, at the versions constraints.txt pins).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SAMPLE := build/sample-torrent
SAMPLE_HF := build/sample-hf

.PHONY: setup demo test lint bench clean

# pip -qq: errors only. Setting up prints no warnings of its own then: setuptools' notice that an editable install
# imports folders named like the package from the working directory (the package-dir mapping makes it use an import
# finder), and a pip configured with an incomplete local index (as on the test machines) naming what it skips.
$(VENV)/.runtime: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -c constraints.txt -e .
	touch $@

# llama-cpp-python (a test dependency) has no wheel on PyPI: pip compiles llama.cpp from its sdist, once (pip keeps
# the wheel in its cache, ~/.cache/pip/wheels, keyed by the sdist alone: after changing these options, run
# `pip cache remove llama_cpp_python`). What cuts the build time: LLAVA_BUILD=OFF (the multimodal library, 51 of
# 193 compile steps), GGML_LLAMAFILE=OFF (a large template file) and -O1 (half of -O3's compile time on the largest
# file; the tests' tiny model needs no speed). The rest leaves out what the tests never use (OpenMP, BLAS, OpenSSL,
# the Q4 repacking, the tools); GPU backends are off by default. GGML_NATIVE=OFF compiles for AVX2/FMA/F16C rather
# than for the build machine's exact CPU, so a cached wheel runs on any x86-64 CPU with AVX2.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_BLAS=OFF -DGGML_LLAMAFILE=OFF \
	-DGGML_CPU_REPACK=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
	-DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1

# Then llama.cpp's own converter (convert_hf_to_gguf.py), from the same sdist, goes to .venv/share/llama.cpp and
# Mixtral's tokenizer.model, from mistral-common's wheel, to .venv/share/mistral-common (tests/llama_client.py).
$(VENV)/.test: $(VENV)/.runtime
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) tests/llama_client.py install --constraints constraints.txt
	touch $@

setup: $(VENV)/.test

demo: $(VENV)/.runtime
	rm -rf $(SAMPLE) $(SAMPLE_HF)
	$(VENV)/bin/mixtral-convert sample $(SAMPLE)
	$(VENV)/bin/mixtral-convert inspect $(SAMPLE)
	$(VENV)/bin/mixtral-convert convert $(SAMPLE) $(SAMPLE_HF) --to hf --instruct --dry-run
	$(VENV)/bin/mixtral-convert convert $(SAMPLE) $(SAMPLE_HF) --to hf --instruct
	$(VENV)/bin/mixtral-convert inspect $(SAMPLE_HF)
	$(VENV)/bin/mixtral-convert verify $(SAMPLE_HF) --against $(SAMPLE)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

# --durations=15: the run ends with its 15 slowest steps, so CI's log shows where the time goes; -rs: and every
# skipped test with its reason (some skip on what the machine allows). One tier alone:
# `$(PY) -m pytest -m unit` (or containers, e2e, clients: pyproject.toml's markers).
test: lint
	$(PY) -m pytest -q -rs --durations=15

# Real-dimension checkpoints (3.4 / 6.3 / 12 GB, cached in bench/cache), cold cache, several minutes a depth.
# `$(PY) bench/run.py --quick` is a smoke run of the script (one 0.3 GB layer, report under bench/cache/quick).
bench: $(VENV)/.runtime
	$(PY) -m pip install --quiet -c constraints.txt matplotlib huggingface_hub  # the plot; the peer shards as save_pretrained
	$(PY) bench/run.py --layers 1 2 4 --repeats 3 --rev HEAD

clean:
	rm -rf $(VENV) build
