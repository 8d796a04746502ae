#!/usr/bin/env bash
# The test suite: unit tests, the embedded-model golden check, and the Snakemake + DVC integration runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
# two workers (pytest-xdist): a stage process spends most of its time importing, on one core; later
# options win (`-n 0` runs in one process); tests are handed out one at a time, the slowest first
# (tests/conftest.py), so no worker is left with a long test at the end
python -m pytest -q -n 2 --maxschedchunk=1 --durations=15 "$@"
