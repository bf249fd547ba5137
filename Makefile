# The README's two commands: `make demo` and `make test`. Both build .venv when it is missing or older than
# pyproject.toml, so they work on a fresh clone with nothing but Python 3.11 and make.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: these releases are served from local disk (see DEVELOPERS.md).
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev,postgres]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/histodetect demo --out demo-output

# pytest exits 5 when no test ran; that must fail, so it is not masked here.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop: every test but those marked slow (training, slides, other processes); under 2 minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/ingest_throughput.py

clean:
	rm -rf demo-output .pytest_cache build *.egg-info
