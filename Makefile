# The two commands in README.md. Both set up .venv first (idempotent).
export PATH := $(CURDIR)/.venv/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup repro test test-quick bench

setup:
	@bash scripts/setup.sh

repro: setup
	@bash scripts/system-deps.sh repro
	dvc repro

test: setup
	@bash scripts/system-deps.sh test
	ruff check .
	pytest --durations=15

test-quick: setup
	pytest -m "not integration"
