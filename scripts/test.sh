#!/usr/bin/env bash
# The whole test suite: unit tests plus integration tests on the real bundled models and a real server.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
