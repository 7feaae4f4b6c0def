#!/usr/bin/env bash
# Quick start 2: set up (with the test requirements) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
exec .venv/bin/python -m pytest -q "$@"
