# make demo / make test work on a fresh machine: both create .venv and install first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: setup chromium demo lint test bench clean

setup: $(STAMP)

# The mlflow extra (mlflow-skinny, skops for the scikit-learn format MLflow 3 logs by default, and
# SQLAlchemy/Alembic for sqlite: tracking stores) and the
# serve extra (Ray Serve) are installed too: the tests run `register mlflow.` against a real local
# registry and `rayudf serve` behind a real Ray Serve on 127.0.0.1.
# rfc3987-syntax (pulled in by Jupyter through jsonschema[format-nongpl]) compiles ~35 Earley
# parsers when imported, and every Ray worker imports it through ray.runtime_env: 1.2 s more
# per worker start (python-jsonschema/jsonschema#1428). Nothing here validates IRIs, so it goes.
# The text extra (torch, transformers, sentence-transformers) is installed too, torch first as a
# CPU-only build: PyPI's Linux torch is a CUDA build of several GB. torch 2.13.0's CPU wheel lies
# on this machine's disk, where pip takes it; elsewhere set
# TORCH="torch --index-url https://download.pytorch.org/whl/cpu" (or a CUDA build, on a GPU machine).
TORCH ?= torch==2.13.0
$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,mlflow,serve,text]'
	$(BIN)/pip uninstall --quiet --yes rfc3987-syntax
	touch $(STAMP)

demo: setup
	$(BIN)/rayudf demo

# Debian's Chromium for tests/test_browser.py (Playwright drives it; it never downloads a browser).
# Installed when missing and we are root; otherwise that one test is skipped, saying why.
chromium:
	@if [ -x $(CHROMIUM) ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "make: $(CHROMIUM) is missing and we are not root: the JupyterLab browser test will be skipped" \
			"(run 'sudo apt-get install chromium chromium-driver' to include it)"; \
	fi

# ruff's rules are in pyproject.toml; a finding fails the build like a failing test.
lint: setup
	$(BIN)/ruff check .

test: setup chromium lint
	$(BIN)/python -m pytest

# The benchmarks (README, "Performance"): SQL scoring, about 15 minutes, writes bench/RESULTS.md;
# serving (docs/serving.md), both ingress modes, about 8 minutes, writes bench/SERVING.md; interactive speed (a new
# session's first registrations), about 6 minutes, writes bench/INTERACTIVE.md; streaming
# (docs/streaming.md), about 3 minutes, writes bench/STREAMING.md; text models, about 12 minutes for
# 1,000 texts (MiniLM-shaped models on 2 cores score tens of texts a second), writes bench/TEXT.md;
# LLMs (generation in SQL and over OpenAI's API), writes bench/LLM.md.
# BENCH_ARGS="--rows 20000" and SERVING_ARGS="--rounds 1 --requests 100" for a quick look.
TEXT_ARGS ?= --rows 1000
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)
	$(BIN)/python -m bench.serving $(SERVING_ARGS)
	$(BIN)/python -m bench.interactive $(INTERACTIVE_ARGS)
	$(BIN)/python -m bench.streaming $(STREAMING_ARGS)
	$(BIN)/python -m bench.text $(TEXT_ARGS)
	$(BIN)/python -m bench.llm $(LLM_ARGS)

clean:
	rm -rf $(VENV) demo_data out bench_data .pytest_cache
