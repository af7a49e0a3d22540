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

$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
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

test: lint
	$(PY) -m pytest -q

# Real-dimension checkpoints (3.4 / 6.3 / 12 GB, cached in bench/cache), cold cache, several minutes a depth.
# `$(PY) bench/run.py --quick` is a smoke run of the script (one 0.3 GB layer, report under bench/cache/quick).
bench: $(VENV)/.runtime
	$(PY) -m pip install --quiet -c constraints.txt matplotlib huggingface_hub  # the plot; the peer shards as save_pretrained
	$(PY) bench/run.py --layers 1 2 4 --repeats 3 --rev HEAD

clean:
	rm -rf $(VENV) build
