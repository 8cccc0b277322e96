# Two commands on a fresh machine:
#   make run    set up .venv if needed, embed the sample corpus (embedded mode: no Redis), ask it a question
#   make test   set up .venv and redis-server if needed, then run the whole test suite
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test setup lint typecheck bench-throughput bench-quality clean

run: $(VENV)/.installed
	$(BIN)/embedpipe run examples/ --probe-eval examples/eval
	$(BIN)/embedpipe search "how do I fix a flat bicycle tyre" -k 3

test:
	scripts/setup.sh --system
	$(BIN)/ruff check embedpipe workers producer shared tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest --durations=25  # the slowest tests, for whoever shortens the suite

setup $(VENV)/.installed: pyproject.toml
	scripts/setup.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check embedpipe workers producer shared tests bench
	$(BIN)/ruff format --check embedpipe workers producer shared tests bench
	$(BIN)/lint-imports  # the layers, the light client, no import cycles (pyproject.toml)

typecheck: $(VENV)/.installed
	$(BIN)/mypy  # the seams: the files listed under [tool.mypy] in pyproject.toml

bench-throughput: $(VENV)/.installed
	$(BIN)/python bench/throughput.py

bench-quality: $(VENV)/.installed
	$(BIN)/python bench/quality.py

clean:
	rm -rf embedpipe-store .pytest_cache .ruff_cache
