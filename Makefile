# `make test` and `make demo` each create .venv and install what they need; a second run skips
# the install (the stamp file is newer than the requirement files).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.drex-installed
OFFLINE := HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: test demo install lint clean

install: $(STAMP)

$(STAMP): requirements-cpu.txt requirements-data.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-cpu.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the import layers in pyproject.toml [tool.importlinter]

test: lint
	$(OFFLINE) DREX_REQUIRE_SMOLLM2=1 $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(OFFLINE) $(BIN)/drex demo
	$(OFFLINE) $(BIN)/drex bench model_cards/smollm2-135m-drex --thresholds guaranteed --batch-sizes 1,8 \
	    --max-new-tokens 32 --out runs/demo-bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache *.egg-info
