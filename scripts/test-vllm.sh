#!/usr/bin/env bash
# The vLLM backend's tests (tests_vllm/) on CPU, in the .venv-vllm made by scripts/setup-vllm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DUET_VLLM_VENV:-.venv-vllm}
export HF_HUB_OFFLINE=1
# vLLM's CPU worker otherwise sizes its KV cache from free RAM; the tests set llm.vllm_kv_cache_gib instead.
"$VENV/bin/python" -m pytest -q tests_vllm "$@"
