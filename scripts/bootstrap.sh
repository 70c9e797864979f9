#!/usr/bin/env bash
# Set up streamquant on a fresh machine: torch only when it is not importable yet (an existing
# torch, e.g. a CUDA build, is kept), then streamquant itself, editable, with its test extra.
# Uses whichever `python` is first on PATH; activate a virtual environment first if you want one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[test]"
