# hessopt: `make test` and `make demo` set up .venv themselves on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch and torchvision are pinned to the builds served from this machine's disk (see README).
TORCH  := torch==2.14.1 torchvision==0.29.1
EXTRAS := dev,timm,plot,fairseq,recipes

.PHONY: venv test demo bench-quick clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# the suite, then the >>> examples in hessopt's docstrings (their names come from ./conftest.py)
test: $(STAMP)
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --doctest-modules hessopt

demo: $(STAMP)
	$(PY) recipes/demo.py --out runs/demo

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --suite all --device cpu --quick --out runs/bench-quick

clean:
	rm -rf $(VENV) runs .pytest_cache
