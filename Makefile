# The two set-up commands of README.md. Each creates or reuses .venv by itself.
.PHONY: demo test lint env

env:
	bash scripts/setup_env.sh

demo: env
	.venv/bin/dyrep-fx demo

test: env
	bash scripts/run_tests.sh

lint: env
	.venv/bin/ruff check dyrep_fx passes tests benchmarks
