#!/usr/bin/env bash
# bench/system.py on the GPU machine (docs/gpu.md), after scripts/gpu-run.sh has installed the `serve` set:
#   [MODES=nothink] [ASR_ENGINE=torch] [EXTRA_SETS="k=v k=v"] [CLIENT_PROCS=K] [TURN_TIMEOUT_S=60] [FRONT_ENDS=N] \
#     scripts/gpu-run.sh scripts/gpu-system.sh "$OUT" [SESSIONS] [DEADLINE_S]
# The whole server on configs/gpu.toml (bundled SmolLM2 on cuda bf16, Whisper in torch on cuda; ASR_ENGINE: asr.engine),
# N spoken sessions from several client processes. A run call is capped at 10 minutes: one mode a call
# (MODES=nothink, then MODES=speak-first) fits 1..128 sessions; merge the calls' reports afterwards with
#   bench/system.py --from-json system-nothink.json system-speak-first.json --md system.md --plot system.png
# FRONT_ENDS=N: the process split, `duet engine` plus N `duet serve` front ends with remote brains on it.
# Writes $OUT/machine.txt, system-<modes>.{json,md,png} (png only where matplotlib is installed), server.log.
# (The issue-9 checks of configs/gpu.toml as shipped, CTranslate2 on cuda and bench/asr_parallel.py that ran
# here before are gone: gpu.toml gets its own end-to-end test.)
set -uo pipefail
OUT=${1:?out dir}; SESSIONS=${2:-1,8,32,64,128}; DEADLINE=${3:-400}
MODES=${MODES:-nothink,speak-first}
TAG=${MODES//,/-}${FRONT_ENDS:+-split$FRONT_ENDS}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; grep -m1 "model name" /proc/cpuinfo
  nproc; } >"$OUT/machine.txt" 2>&1
# configs/gpu.toml as shipped (CONFIG= another file), with only what a benchmark from one host needs on top.
CONFIG=${CONFIG:-configs/gpu.toml}
SETS=(
  # Headroom over 128: every turn is a new WebSocket, so a session's next connection can open before the server
  # has closed its last one. Every session comes from 127.0.0.1: no per-client cap (0), or most get 429.
  --set server.max_sessions=256 --set auth.max_connections_per_client=0
)
if [ -n "${ASR_ENGINE:-}" ]; then SETS+=(--set "asr.engine=$ASR_ENGINE"); fi
set -f  # EXTRA_SETS is split on spaces, never globbed
for kv in ${EXTRA_SETS:-}; do SETS+=(--set "$kv"); done  # later --set wins: EXTRA_SETS can override the above
# exec: an outer `timeout` then signals the bench itself, which stops the server and its clients and still writes
# the levels it finished (a bash in between would die and leave them running).
exec python3 bench/system.py --config "$CONFIG" --sessions "$SESSIONS" --modes "$MODES" --deadline-s "$DEADLINE" \
  --client-procs "${CLIENT_PROCS:-0}" --front-ends "${FRONT_ENDS:-0}" --turn-timeout-s "${TURN_TIMEOUT_S:-60}" "${SETS[@]}" \
  --out "$OUT/system-$TAG.json" --md "$OUT/system-$TAG.md" --plot "$OUT/system-$TAG.png" \
  --server-log "$OUT/server.log"
