# The two commands a newcomer needs (see README): `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench bench-linux clean

setup:
	./scripts/setup

demo: setup
	./scripts/demo

test: setup
	./scripts/test $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check kvmcore devices pv daemon guests tests bench

bench: setup
	.venv/bin/python -m bench.exits
	.venv/bin/python -m bench.daemon

bench-linux: setup
	.venv/bin/python -m bench.linux

clean:
	rm -rf .venv build .pytest_cache .hypothesis
