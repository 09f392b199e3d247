#!/usr/bin/env bash
# Wheels the lent GPU machines lack (their package list: the device tool's KINDS.md), into
# the ignored folder .whl/ that scripts/gpu_bench.sh installs from. Run here, where pip
# reaches a registry:  bash scripts/gpu_wheels.sh
# The versions are this project's (the setup's venv); the GPU machine runs Python 3.12.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "diffusers==$(ver diffusers)" "importlib_metadata==$(ver importlib_metadata)"
ls -la .whl
