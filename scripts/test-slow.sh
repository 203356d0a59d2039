#!/usr/bin/env bash
# The long reproductions (minutes to hours on CPU), kept out of the default suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m slow "$@"
