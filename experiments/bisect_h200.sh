#!/usr/bin/env bash
# Why does C3e14-s10 of the committed H200 study (experiments/results/isoflop_h200: eval loss 3.586, trained by
# commit bfca587) give 3.104 on the code of 2026-12-06 while C1e15-s10 gives 2.280 against 2.262? On the CPU the
# code of bfca587 and of 763bcac train this setup to the same losses (the data order, tokenizer, eval set,
# schedule, optimizer, loss and init did not change there), so what moved is in the GPU paths, or in the run
# itself. One GPU job of about 7 minutes (a point is 30-40 s, the corpus is tokenized once or twice):
#   head_a, head_b     today's code twice: the run-to-run spread of this point on one GPU
#   head_xla_attention attention in XLA instead of the Mosaic flash kernels (changed in b6a250a, fd8c02f, 3742a13)
#   head_after_c1e14   C1e14-s10 (committed 4.909), then C3e14-s10 in the same process, as part 1 ran them
#   old_b981d12        the same two, by the code of the study's last part, from .bisect/b981d12 (prepare it first:
#                      mkdir -p .bisect/b981d12 && git archive b981d12 qwenjax configs experiments | tar -x -C
#                      .bisect/b981d12 ; .bisect must not be git-ignored, so that it travels with the tree)
# Each prints `NAME: ... eval_loss X`. If head_a and head_b differ by more than 0.02, the point is not
# reproducible on one code (an unstable run: a 37-step warmup at lr 3e-3); else the variant that returns to 3.59
# names the change. Logs in $OUT.
# Run 2026-12-07 on one H100 80GB HBM3 at 16aba90, the first three only: head_a 3.554, head_b 3.492,
# head_xla_attention 3.581: the committed 3.586 is within one code's run-to-run spread of 0.06
# (experiments/README.md). The loss kernels' variant is left out: `train.loss_impl` is not a key of the sweep
# file's overrides, so the sweep's flags cannot set it.
set -u
WORK=${WORK:-/tmp/bisect_h200}
OUT=${OUT:-/tmp/bisect_h200_out}
mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 XLA_FLAGS=${XLA_FLAGS:---xla_gpu_autotune_level=0}  # as the committed study ran
ROOT=$PWD
ARGS=(--sweep=experiments/isoflop_h200.py --sweep.overrides.data.prepared_dir="$WORK/prepared")

run() {  # name, directory of the code, extra flags...
  local name=$1 code=$2
  shift 2
  (cd "$code" && timeout 300 python3 -m qwenjax.sweep "${ARGS[@]}" --workdir="$WORK/$name" "$@") \
    > "$OUT/$name.log" 2>&1
  echo "$name: exit $?, $(grep -ho '[^ ]* done: eval_loss [0-9.]*' "$OUT/$name.log" | tr '\n' ' ')"
}

run head_a "$ROOT" --only=C3e14-s10
run head_b "$ROOT" --only=C3e14-s10
run head_xla_attention "$ROOT" --only=C3e14-s10 --sweep.overrides.model.attention_impl=xla
run head_after_c1e14 "$ROOT" --only=C1e14-s10,C3e14-s10
if [ -d "$ROOT/.bisect/b981d12/qwenjax" ]; then
  run old_b981d12 "$ROOT/.bisect/b981d12" --only=C1e14-s10,C3e14-s10
else
  echo "old_b981d12: skipped (no .bisect/b981d12: see the comment at the top)"
fi
