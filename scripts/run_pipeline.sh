#!/usr/bin/env bash
# The default grid on the embedded SmolLM2-135M: every stage, then reports/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
pruneflow run --resources gpu=2 "$@"   # Snakemake with --cores all
