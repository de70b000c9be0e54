#!/usr/bin/env bash
# bench/gpu_check.sh: the three speed benchmarks at CIFAR scale on one GPU, then a summary.
#
#   bash bench/gpu_check.sh            # one H100: about 6-7 minutes with one repetition per side
#                                      # (REPS=1); the default REPS=3 runs each side 3 times, alternating,
#                                      # and has not been timed on a GPU yet (step limits below)
#
# 1. train_speed: PreAct-ResNet18 on synthetic 50,000/10,000 (BadNets 10%), paper recipe
#    SHORTENED to 8 of its 100 epochs (cosine compressed; printed as such) vs fast recipe, side
#    by side, REPS alternating repetitions. Saves the fast backdoored model for step 2.
# 2. tsbd_speed: our TSBD vs the transcribed reference on that model (Dc = 2,500 images), REPS
#    alternating repetitions.
#    Then the 8 baselines (default parameters) on the same model, timed one by one, cheapest
#    first; the JSON is rewritten after each, so a time limit keeps those measured (ANP, 2,000
#    batches, is last: on CPU it took 18x one TSBD run).
# 3. grid_packing: a 2-attack x 2-seed grid through bdgrid's runner with 1, 2, 4 trials per GPU,
#    REPS alternating repetitions of each.
# 4. project_grid: H100-hours for the full CIFAR-10 paper grid from the measured stage times.
#
# Results land in $BENCH_OUT (default: $OUT when the device tool sets it, else bench/out/gpu).
# Each step has its own time limit, so one slow step cannot eat the others' budget; a step that
# fails or times out is reported and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${BENCH_OUT:-${OUT:-bench/out/gpu}}
THREADS=${THREADS:-8}
REPS=${REPS:-3}
mkdir -p "$DEST"
T0=$(date +%s)
status=0

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$DEST/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc $rc in $(( $(date +%s) - t ))s"
  if [ "$rc" -ne 0 ]; then status=1; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$DEST/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || exit 1

step train_speed $(( 180 * REPS )) "$PY" bench/train_speed.py --gpu --threads "$THREADS" --paper-epochs 8 \
  --reps "$REPS" --json "$DEST/train_speed.json" --save-model "$DEST/preact_fast.pt"
step tsbd_speed $(( 100 * REPS )) "$PY" bench/tsbd_speed.py --gpu --threads "$THREADS" --model "$DEST/preact_fast.pt" \
  --reps "$REPS" --json "$DEST/tsbd_speed.json"
step baselines 80 "$PY" bench/tsbd_speed.py --gpu --threads "$THREADS" --model "$DEST/preact_fast.pt" \
  --sides "" --baselines clp,nad,rnp,ibau,ft,fp,ftsam,anp --json "$DEST/baselines.json"
step grid_packing $(( 40 + 90 * REPS )) "$PY" bench/grid_packing.py --seeds 2 --reps "$REPS" \
  --json "$DEST/grid_packing.json"
rm -f "$DEST/preact_fast.pt"  # 45 MB; not a result

echo
echo "================ SUMMARY ($(( $(date +%s) - T0 ))s total)"
cat "$DEST/gpu.txt"
grep -h -E "^(# SHORTENED|RATIO|FIDELITY|PROJECTED|BASELINES)" "$DEST/train_speed.log" "$DEST/tsbd_speed.log" \
  "$DEST/baselines.log" "$DEST/grid_packing.log" 2>/dev/null
if [ -f "$DEST/train_speed.json" ] && [ -f "$DEST/tsbd_speed.json" ]; then
  BJ=(); [ -f "$DEST/baselines.json" ] && BJ=(--baselines-json "$DEST/baselines.json")
  "$PY" bench/project_grid.py "$DEST/train_speed.json" "$DEST/tsbd_speed.json" "${BJ[@]}" \
    --json "$DEST/projection.json" | tee "$DEST/projection.log"
fi
exit $status
