#!/usr/bin/env bash
# One piece of a GPU study, under a time limit; the next piece resumes it:
#   bash experiments/gpu_piece.sh STUDY SECONDS [sweep flags, e.g. --only=NAME,NAME]
# STUDY is a sweep file of experiments/ (isoflop_gpu, isoflop_gpu_kaplan), or FILE:ARG for a file that takes an
# argument (isoflop_gpu_lrcheck:C1e16-s15: its directories are then FILE/ARG). Run from the repository's root with
# qwenjax importable (PYTHONPATH=$PWD, after installing the wheels the GPU image lacks). Two pieces side by side
# in one call need XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 each: a jax process takes 75% of the GPU when it starts, so
# the second one's kernels fail to autotune (the rate checks' first call lost 571 s so). It
#   0. stops at once if a package setup.py requires is missing (experiments/preflight.py);
#   1. writes the extra corpus (experiments/gpu_corpus.py) unless this machine has it;
#   2. starts the sweep's directory from the committed experiments/results/STUDY/{results.jsonl,sweep.json} unless
#      this machine already has one (a fresh machine has none of the points finished so far);
#   3. runs the sweep for at most SECONDS (SIGTERM then: the point in progress checkpoints, and resumes next time
#      on this machine; on a fresh one it starts again); with WORKERS=K (K > 1), K points at once
#      (experiments/sweep_workers.py, stopping its workers a minute before the limit);
#   4. adds a line to pieces.jsonl (its seconds here, the GPU, the points finished before and after: what
#      experiments/study_speed.py reads) and copies results.jsonl, sweep.json, lr.json, pieces.jsonl, the log and
#      the workers' logs (workers.log: every worker's since this machine started, no step lines) to $OUT/STUDY,
#      six files, to be committed to
#      experiments/results/STUDY before the next piece. sweep.json holds the code version: the sweep refuses to go
#      on under other code, so run every piece from one commit.
set -u
STUDY=$1
LIMIT=$2
shift 2
FILE=${STUDY%%:*}
SWEEP=experiments/$FILE.py
NAME=$FILE
if [ "$FILE" != "$STUDY" ]; then SWEEP=$SWEEP:${STUDY#*:}; NAME=$FILE/${STUDY#*:}; fi
WORK=${WORK:-/tmp/qwenjax_studies}
OUT=${OUT:-/tmp/qwenjax_studies_out}
DIR=$WORK/$NAME
SAVED=experiments/results/$NAME
BACK=$OUT/$NAME
mkdir -p "$DIR" "$BACK"
START=$(date +%s)
export PYTHONUNBUFFERED=1
python3 experiments/preflight.py setup.py || exit 1  # a missing package fails here, not in every worker
python3 experiments/gpu_corpus.py /tmp/qwenjax_gpu_corpus || exit 1
for name in results.jsonl sweep.json pieces.jsonl; do
  if [ -f "$SAVED/$name" ] && [ ! -f "$DIR/$name" ]; then cp "$SAVED/$name" "$DIR/$name"; fi
done
count() { (wc -l < "$DIR/results.jsonl") 2>/dev/null || echo 0; }
BEFORE=$(count)
WORKERS=${WORKERS:-1}
if [ "$WORKERS" -gt 1 ]; then
  timeout -s TERM -k 30 "$LIMIT" python3 experiments/sweep_workers.py --sweep="$SWEEP" --workdir="$DIR" \
    --workers="$WORKERS" --seconds=$((LIMIT > 120 ? LIMIT - 60 : LIMIT / 2)) "$@" >> "$BACK/sweep.log" 2>&1
  status=$?
  for log in "$DIR"/workers/*/sweep.log; do  # one file (a device call returns few): each worker's, step lines left out
    [ -f "$log" ] && { echo "== worker $(basename "$(dirname "$log")")"; grep -v ' step [0-9]*/[0-9]* |' "$log"; }
  done > "$BACK/workers.log"
else
  timeout -s TERM -k 30 "$LIMIT" python3 -m qwenjax.sweep --sweep="$SWEEP" --workdir="$DIR" "$@" \
    >> "$BACK/sweep.log" 2>&1
  status=$?
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
printf '{"piece": %d, "seconds": %d, "device": "%s", "workers": %d, "finished_before": %d, "finished_after": %d, '\
'"date": "%s"}\n' \
  $(( $( (wc -l < "$DIR/pieces.jsonl") 2>/dev/null || echo 0) + 1 )) $(( $(date +%s) - START )) "${GPU:-unknown}" \
  "$WORKERS" "$BEFORE" "$(count)" "$(date -u +%Y-%m-%dT%H:%MZ)" >> "$DIR/pieces.jsonl"
for name in results.jsonl sweep.json lr.json pieces.jsonl; do
  if [ -f "$DIR/$name" ]; then cp "$DIR/$name" "$BACK/$name"; fi
done
grep -h 'sweep: .* done\|sweep: .* stopped\|lr stage\|sweep_workers\|error' "$BACK"/*.log | tail -40
finished=$(count)
echo "$STUDY: exit $status (0: done, or with WORKERS its workers stopped in time; 124: the time limit stopped it; run the next piece until every point is finished); $finished points finished"
