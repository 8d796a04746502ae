#!/usr/bin/env bash
# The test suite: unit tests, the embedded-model golden check, and the Snakemake + DVC integration runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=15 "$@"
