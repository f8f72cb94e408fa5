#!/usr/bin/env bash
# Issue 9's run on the GPU machine (docs/gpu.md): after scripts/gpu-run.sh has installed the `serve` set.
#   scripts/gpu-run.sh scripts/gpu-system.sh "$OUT" [SESSIONS] [DEADLINE_S]
# (BENCH_ONLY=1: step 4 alone) 1. does configs/gpu.toml as shipped start; 2. CTranslate2 on cuda (the error asr.device names);
# 3. ASR in turn / parallel / batched on this CPU; 4. bench/system.py with the bundled SmolLM2 on cuda bf16.
set -uo pipefail
OUT=${1:?out dir}; SESSIONS=${2:-1,8,32,64}; DEADLINE=${3:-330}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; grep -m1 "model name" /proc/cpuinfo
  nproc; } >"$OUT/machine.txt" 2>&1
if [ -z "${BENCH_ONLY:-}" ]; then
timeout 90 python3 -m duet.cli serve --config configs/gpu.toml --port 8799 >"$OUT/shipped.log" 2>&1
echo "shipped gpu.toml exit $?" >>"$OUT/shipped.log"
timeout 60 python3 -c "
from common.config import AsrConfig; from realtime.speech_in.asr import Listener
try: Listener.load(AsrConfig(device='cuda', compute_type='float16'))
except Exception as e: print(type(e).__name__, e)" >>"$OUT/shipped.log" 2>&1
timeout 90 python3 bench/asr_parallel.py --turns 4 --threads 8 --out "$OUT/asr_parallel.json" >>"$OUT/shipped.log" 2>&1
fi
# One client address opens every session: lift the per-client cap (auth.max_connections_per_client, 16).
python3 bench/system.py --sessions "$SESSIONS" --modes nothink,speak-first --deadline-s "$DEADLINE" \
  --set llm.device=cuda --set llm.dtype=bfloat16 --set llm.quantize=none --set llm.max_slots=128 \
  --set server.max_sessions=128 --set auth.max_connections_per_client=128 --set asr.workers=4 --set asr.cpu_threads=2 --set tts.workers=4 \
  --out "$OUT/system.json" --md "$OUT/system.md" --server-log "$OUT/server.log"
