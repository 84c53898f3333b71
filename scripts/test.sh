#!/usr/bin/env bash
# Set up (idempotent) and run the default test suite (CPU; Triton kernels
# through TRITON_INTERPRET=1). Slow tests: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1
# Lint first (a few seconds): pyproject.toml's [tool.ruff] rules.
.venv/bin/python -m ruff check --quiet .
exec .venv/bin/python -m pytest -q "$@"
