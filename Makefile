# appliance: the two fresh-machine entry points are `make example` and `make test` (see README).
VENV ?= .venv
BIN := $(VENV)/bin
export VENV

.PHONY: setup example test test-fast lint docs golden clean bench

setup:
	@scripts/setup

example: setup
	$(BIN)/appliance build profiles/exit-node.yaml

test: setup lint
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not root and not slow and not vm"

lint: setup
	$(BIN)/ruff check appliance tests bench
	$(BIN)/mypy appliance tests bench
	$(BIN)/lint-imports

docs: setup
	$(BIN)/appliance schema -o schema/profile.schema.json
	$(BIN)/python -m appliance.profile.readme README.md

golden: setup
	APPLIANCE_REFRESH_GOLDEN=1 $(BIN)/pytest -q tests/test_golden.py
	git diff --stat tests/golden

clean:
	rm -rf build images/*.config .pytest_cache .hypothesis

bench: setup
	$(BIN)/python bench/image.py
	$(BIN)/python bench/boot.py
	$(BIN)/python bench/dataplane.py
	$(BIN)/python bench/validate.py
