#!/usr/bin/env bash
# Create the project's virtual environment (.venv) once and install a requirements file into
# it (default requirements.txt). Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
