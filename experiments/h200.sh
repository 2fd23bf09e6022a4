#!/usr/bin/env bash
# The H200 run behind experiments/README.md: the IsoFLOP sweep, the MFU of the ladder's 50M+ models, and the μP
# learning-rate sweep, each under its own time limit (SIGTERM: the point in progress checkpoints, the sweep stops,
# and a later run resumes it). Results and logs are copied to $OUT. Extra arguments go to every sweep, e.g. the
# tiny CPU dry run: bash experiments/h200.sh --sweep.budgets=... (see experiments/README.md).
set -u
OUT=${OUT:-/tmp/h200_out}
WORK=${WORK:-/tmp/h200_sweeps}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
sweep() {
  local name=$1 limit=$2
  shift 2
  timeout --kill-after=30 "$limit" python3 -m qwenjax.sweep --sweep="experiments/$name.py" --workdir="$WORK/$name" \
    --sweep.overrides.data.prepared_dir="$WORK/prepared" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $SECONDS s"
  cp "$WORK/$name/results.jsonl" "$OUT/$name.results.jsonl" 2>/dev/null
}
sweep isoflop_h200 "${ISOFLOP_S:-330}" "$@"
cp "$WORK/isoflop_h200/sweep.json" "$OUT/isoflop_h200.sweep.json" 2>/dev/null
sweep mfu_h200 "${MFU_S:-100}" "$@"
sweep mup_lr "${MUP_S:-130}" "$@"
