#!/usr/bin/env bash
# Create the project's virtual environment (.venv) once and install a requirements file into
# it (default requirements.txt). Safe to re-run: pip skips what is already installed.
# --no-cache-dir: torch + torchvision come with ~5.5 GB of CUDA libraries on a fresh machine;
# keeping pip's copy of every downloaded wheel as well would need ~3 GB more disk for nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=${1:-requirements.txt}
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ -n "$free_kb" ] && [ "$free_kb" -lt 8000000 ] && ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup.sh: warning: $((free_kb / 1024)) MiB free on $(pwd); installing torch + torchvision needs about 7 GiB" >&2
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -r "$requirements"
