# The two commands of README: `make demo` (the embedded quickstart) and `make test`.
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/dpldm quickstart --out runs/quickstart

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -x tests

bench: setup
	.venv/bin/python benchmarks/run_all.py
