#!/usr/bin/env bash
# Set up the environment, lint, and run the default test suite (slow/browser/ray tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check .
# pytest exits 5 when it collected no test: that is a failure here, as any non-zero code is.
.venv/bin/python -m pytest -q "$@"
