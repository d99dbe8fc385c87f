# The two set-up commands of README.md. Each creates or reuses .venv by itself.
.PHONY: demo test lint env test-cuda explore

env:
	bash scripts/setup_env.sh

demo: env
	.venv/bin/dyrep-fx demo

test: env
	bash scripts/run_tests.sh

lint: env
	.venv/bin/ruff check dyrep_fx dyrep_fx_examples passes tests benchmarks

# On a machine with a CUDA GPU: the numerics, block, assembly, AMP (float16 + GradScaler), memory-Function and
# nccl DDP tests on CUDA (the tests marked `cuda`; without a GPU they are skipped).
test-cuda: env
	bash scripts/run_tests.sh -m cuda

# Random exploration of the property tests: new random examples, 10x each test's budget (hypothesis profile
# "explore"); `make test` runs them derandomized (profile "ci"). Failures are kept in .hypothesis/ and replay.
explore: env
	DYREP_FX_HYPOTHESIS_PROFILE=explore bash scripts/run_tests.sh -m hypothesis
