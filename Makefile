# fedct — `make demo` and `make test` are the whole quick start.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedct demo --config configs/demo.toml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.preprocess --profile
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.diagnose
	$(BIN)/python -m bench.train_throughput
	$(BIN)/python -m bench.fl_vs_baselines --strategies fedavg,fedbn
	$(BIN)/python -m bench.fl_overhead
	$(BIN)/python -m bench.dp_utility
	$(BIN)/python -m bench.fl_scale
	$(BIN)/python -m bench.cli_help

clean:
	rm -rf demo runs bench/results .pytest_cache .ruff_cache .hypothesis
