#!/usr/bin/env bash
# Set up the environment and run the main job: `widthlab demo` on scikit-learn's bundled digits.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/widthlab demo "$@"
