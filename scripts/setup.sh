#!/usr/bin/env bash
# Set up ./.venv for this checkout: CPU torch first, then normswap (editable) with its test extra.
#
#   scripts/setup.sh            # or: make setup
#
# Idempotent: a second run does nothing unless pyproject.toml (or the torch pin) changed, detected
# by a stamp file holding their hash. Environment:
#   PYTHON=python3.12           the interpreter that makes the venv (default python3, >= 3.10)
#   NORMSWAP_TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
#                               what to install as torch (default: the CPU-only pin below)
#   NORMSWAP_REINSTALL=1        run the installs even if the stamp says they are done (CI)
# Other scripts source this file (`. scripts/setup.sh`) and get the venv activated.
set -euo pipefail

_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_python="${PYTHON:-python3}"
# CPU torch first: a plain `torch` requirement from PyPI would pull a multi-GB CUDA build.
_torch="${NORMSWAP_TORCH:-torch==2.13.0}"
_venv="$_root/.venv"
_stamp="$_venv/.normswap-setup"

_fail() { echo "error: $*" >&2; exit 2; }

command -v "$_python" >/dev/null 2>&1 || _fail "$_python not found: install Python 3.10 or newer (or set PYTHON=...)"
"$_python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || _fail "normswap needs Python >= 3.10; $_python is $("$_python" -c 'import sys; print(sys.version.split()[0])')"

# The stamp is keyed on what decides the installed set: pyproject.toml and the torch spec.
_want="$( { cat "$_root/pyproject.toml"; echo "$_torch"; } | "$_python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"

if [ ! -x "$_venv/bin/python" ]; then
    echo "setup: creating $_venv" >&2
    "$_python" -m venv "$_venv" || _fail "could not create $_venv (on Debian/Ubuntu: apt install python3-venv)"
fi
. "$_venv/bin/activate"

if [ "${NORMSWAP_REINSTALL:-0}" != "1" ] && [ -f "$_stamp" ] && [ "$(cat "$_stamp")" = "$_want" ] && [ -x "$_venv/bin/normswap" ]; then
    echo "setup: $_venv is up to date (delete $_stamp to reinstall)" >&2
else
    echo "setup: installing $_torch, then normswap[test] (a few minutes the first time)" >&2
    rm -f "$_stamp"
    python -m pip install -q --upgrade pip
    # shellcheck disable=SC2086 # NORMSWAP_TORCH may carry pip options (--index-url ...)
    python -m pip install -q $_torch
    python -m pip install -q -e "$_root[test]"
    echo "$_want" > "$_stamp"
    echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))" >&2
fi

# Offline by default: the demo and the tests read only the shared assets.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export NORMSWAP_ASSETS="${NORMSWAP_ASSETS:-$(cd "$_root/.." && pwd)/shared/assets}"
