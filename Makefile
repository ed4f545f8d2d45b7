# Two commands do all set-up on a fresh machine:
#   make demo   compare dense / GTP / ToMe / EViT on the shipped reference model and the Fashion-MNIST test set
#   make test   run the test suite
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test test-all test-timm-floor lint bench clean

$(VENV)/.leanvit-installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh

setup: $(VENV)/.leanvit-installed

# the method options are the ones chosen on the held-out split (benchmarks/results/tune_gtp.json)
demo: setup
	$(BIN)/leanvit compare $$($(BIN)/python scripts/demo_options.py) --json results/compare.json --plot results/compare.png

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# the equivalence tests on the oldest timm pyproject.toml allows (installed into .timm-floor/, the venv keeps its own)
test-timm-floor: setup
	VENV=$(VENV) bash scripts/test_timm_floor.sh

# import-linter contracts (.importlinter)
lint: setup
	$(BIN)/lint-imports

clean:
	rm -rf results .pytest_cache
