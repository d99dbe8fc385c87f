#!/usr/bin/env bash
# Run the whole test suite (fast and slow tests) in the project's venv, then ruff.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export TORCH_NUM_THREADS="${TORCH_NUM_THREADS:-2}"
# Property tests derandomized (the same examples every run; tests/helpers/profiles.py) unless the caller
# chose a profile (`make explore`: random examples).
export DYREP_FX_HYPOTHESIS_PROFILE="${DYREP_FX_HYPOTHESIS_PROFILE:-ci}"
.venv/bin/ruff check dyrep_fx dyrep_fx_examples passes tests benchmarks
# -p no:cacheprovider keeps a clean clone clean; exit code 5 (no tests collected) is a failure too.
.venv/bin/python -m pytest -p no:cacheprovider "$@"
