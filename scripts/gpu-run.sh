#!/usr/bin/env bash
# Run ON the GPU machine, first in a `run` command:  scripts/gpu-run.sh python3 -m pytest -q tests/brains
# Joins the wheel parts made by scripts/gpu-stage.sh (carried one per call, into .gpu/partNN/, where
# earlier calls' parts stay while the machine is warm), installs them into /tmp/duet-site and runs "$@".
# With parts still missing it says which and exits 3: carry the next one in the next call, within the
# machine's 30 s warm window.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/duet-site
if [ ! -e "$SITE/.staged" ]; then
  read -r SET N SUM <"$(ls .gpu/part[0-9]*/MANIFEST | head -1)"
  for i in $(seq -f %02g 0 $((N - 1))); do
    [ -f .gpu/part$i/wheels.tar.part ] || { echo "gpu-run: '$SET' has part$i of $N missing: carry .gpu/part$i" >&2; exit 3; }
  done
  echo "$SUM  -" >/tmp/duet-tar.sum
  cat .gpu/part[0-9]*/wheels.tar.part | sha256sum -c --quiet /tmp/duet-tar.sum  # parts of one staging
  rm -rf /tmp/duet-wheels && mkdir -p /tmp/duet-wheels
  cat .gpu/part[0-9]*/wheels.tar.part | tar -xf - -C /tmp/duet-wheels
  # --target and no index: only our wheels, the image's torch/triton/transformers stay as they are.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" /tmp/duet-wheels/*.whl
  echo "$SET" >"$SITE/.staged"
  echo "gpu-run: installed '$SET' ($(ls /tmp/duet-wheels | wc -l) wheels) into $SITE" >&2
fi
# Ours first, then the checkout; the image's site-packages (torch cu130) come after both.
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ $# -eq 0 ] || exec "$@"
