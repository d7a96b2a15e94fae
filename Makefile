# Set-up happens on demand: `make demo` and `make test` each create .venv when it is missing,
# install torch there if it has none (the CPU wheel pinned below; override with
# TORCH="torch==X" for a CUDA build), then install lmgen-fast with its dev, hf, plot, eval
# and structured extras (every integration's tests run in CI).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmgen-fast-installed

# The inner loop: what runs in about a minute (tests/conftest.py marks the rest).
QUICK := not slow and not interpreter and not statistical and not subprocess and not aot

.PHONY: demo test quick bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,hf,plot,eval,structured]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmgen-fast generate "The list type" --max-tokens 60 --seed 0 \
		--temperature 0.8 --repetition-penalty 1.2

# One worker per core; a module's tests stay on one worker (module fixtures run once).
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadscope

quick: $(STAMP)
	$(PY) -m pytest -q -m "$(QUICK)"

bench: $(STAMP)
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_reference.py
	$(PY) benchmarks/bench_hf.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
