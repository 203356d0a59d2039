#!/usr/bin/env bash
# Create .venv with widthlab installed (editable) and torch pinned to the CPU build in constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,search,docs]'
# The adaptive-width CPU kernel (about a minute, once): built now rather than inside the first run that
# needs it. Without a C++ compiler adaptive layers run on PyTorch operations, so a failure is not fatal.
.venv/bin/widthlab build-cpu-kernel || true
