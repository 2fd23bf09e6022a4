#!/usr/bin/env bash
# The H200 run behind experiments/README.md, as one job of under 10 minutes:
#   1. tokenize the corpus once and check every point stays under one epoch (if the installed packages hold too
#      few tokens, the IsoFLOP budgets are halved);
#   2. the IsoFLOP sweep (experiments/isoflop_h200.py);
#   3. the MFU of the ladder's 50M+ models (experiments/mfu_h200.py);
#   4. the μP learning-rate sweep (experiments/mup_lr.py).
# Each sweep has its own time limit: on SIGTERM the point in progress checkpoints and the sweep stops, and running
# this again resumes it. Results and logs are copied to $OUT. The IsoFLOP and μP sweeps compile with XLA's
# autotuning off (their models are small; the loss does not depend on the kernel chosen): it shortens each
# point's compilation. The MFU sweep keeps it.
set -u
OUT=${OUT:-/tmp/h200_out}
WORK=${WORK:-/tmp/h200_sweeps}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
FAST_COMPILE='--xla_gpu_autotune_level=0'
XLA_FLAGS="$FAST_COMPILE" python3 -c 'import jax; jax.numpy.ones(1).block_until_ready()' 2>/dev/null || FAST_COMPILE=''
COMMON=(--sweep.overrides.data.prepared_dir="$WORK/prepared" "$@")  # arguments of this script go to every sweep
read -r -a ISO <<< "${ISO_ARGS:-}"  # and these to one (the CPU dry run in experiments/README.md shrinks them)
read -r -a MFU <<< "${MFU_ARGS:-}"
read -r -a MUP <<< "${MUP_ARGS:-}"

sweep() {  # name, time limit in s, XLA flags, its own flags...
  local name=$1 limit=$2 xla=$3
  shift 3
  XLA_FLAGS="$xla" timeout --kill-after=30 "$limit" python3 -m qwenjax.sweep --sweep="experiments/$name.py" \
    --workdir="$WORK/$name" "${COMMON[@]}" "$@" >> "$OUT/$name.log" 2>&1
  echo "$name: exit $? at $SECONDS s"
  cp "$WORK/$name/results.jsonl" "$OUT/$name.results.jsonl" 2>/dev/null
}

if ! timeout 150 python3 -m qwenjax.sweep --sweep=experiments/isoflop_h200.py --workdir="$WORK/isoflop_h200" \
    "${COMMON[@]}" "${ISO[@]}" --emit > "$OUT/prepare.log" 2>&1; then
  grep -q 'more than max_epochs' "$OUT/prepare.log" && ISO+=('--sweep.budgets=(5e13,1.5e14,5e14)')
fi
echo "prepared at $SECONDS s; IsoFLOP arguments: ${ISO[*]}"
grep -h 'tokens in\|error' "$OUT/prepare.log" | tail -3

sweep isoflop_h200 "${ISOFLOP_S:-290}" "$FAST_COMPILE" "${ISO[@]}"
cp "$WORK/isoflop_h200/sweep.json" "$OUT/isoflop_h200.sweep.json" 2>/dev/null
sweep mfu_h200 "${MFU_S:-100}" '' "${MFU[@]}"
MUP_S=${MUP_S:-$((575 - SECONDS))}  # what is left of the 10 minutes
(( MUP_S > 30 )) && sweep mup_lr "$MUP_S" "$FAST_COMPILE" "${MUP[@]}"
nvidia-smi --query-gpu=name --format=csv,noheader || true
