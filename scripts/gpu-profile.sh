#!/usr/bin/env bash
# Where the server's GIL goes under load, on the GPU machine (docs/gpu.md). Run beside scripts/gpu-system.sh:
#   scripts/gpu-profile.sh OUT [AFTER_READY_S=12] [DURATION_S=30] &  scripts/gpu-run.sh scripts/gpu-system.sh OUT 64
# Waits for the benchmark's server (duet.cli serve on --port 8791) to answer /readyz, lets the clients ramp up, then
# samples it with py-spy (a wheel carried in .gpu/extra, not a Duet dependency): --gil keeps only the thread that
# holds the GIL, so the collapsed stacks say which thread is the bound. Writes OUT/pyspy-gil.txt (raw, one
# "stack count" line each) and OUT/pyspy-dump.txt (every thread's stack once).
set -uo pipefail
OUT=${1:?out dir}; AFTER=${2:-12}; DUR=${3:-30}; PORT=${PORT:-8791}
python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .gpu/extra/py_spy-*.whl 2>&1 | tail -1
SPY=/tmp/pyspy/bin/py-spy
for _ in $(seq 300); do
  python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/readyz', timeout=2)" \
    2>/dev/null && break
  sleep 1
done
PID=$(pgrep -f "duet.cli serve" | head -1)
[ -n "$PID" ] || { echo "gpu-profile: no server" >&2; exit 1; }
sleep "$AFTER"
"$SPY" record --gil --threads --nonblocking -r 100 -d "$DUR" -f raw -o "$OUT/pyspy-gil.txt" -p "$PID" \
  >"$OUT/pyspy.log" 2>&1 || echo "gpu-profile: py-spy record failed (see pyspy.log)" >&2
"$SPY" dump -p "$PID" >"$OUT/pyspy-dump.txt" 2>&1 || true
