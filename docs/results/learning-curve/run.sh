#!/usr/bin/env bash
# The learning-curve runs: the demo configuration (configs/demo.yaml) on a larger phantom corpus,
# trained for STEPS optimizer steps with the encoders evaluated every EVERY steps during training
# (train.eval_every), one run per loss preset and seed, same corpus, shards and test phantoms for all;
# then `pertvl report curves` draws them into this folder.
#
#   bash docs/results/learning-curve/run.sh                      # full and convirt, seed 0, 1,000 steps
#   PRESETS="full convirt no_local gloria" SEEDS="0 1 2" bash docs/results/learning-curve/run.sh
#   nohup bash docs/results/learning-curve/run.sh > runs/learning-curve.log 2>&1 &   # in the background
#
# Budget on 2 CPU cores (2 ranks, micro-batch 16 each = 32 pairs per step): ~3 s per step, so
# ~55 min per 1,000-step run, plus ~20 evaluations of ~10-20 s each on the 5,000-phantom corpus's
# validation split (~250 phantoms): ~1 h per preset and seed, ~2 h for full + convirt. Data once:
# ~5 min (generate, perturb, counterfactuals, pack).
# Epochs: 4,388 training phantoms / 32 pairs = 137 steps per epoch, so 1,000 steps = 7.3 epochs
# (every point's epoch is in metrics.jsonl as eval/epoch and on the figure's top axis).
# Checkpoints every EVERY steps, all kept (~85 MB each): any point can be exported and scored again
# (`pertvl export --checkpoint RUN/checkpoints/stepNNNNNNNN --out DIR`, then `pertvl eval … --export DIR`).
# A run that stopped resumes where it was (--resume latest): rerun the same command.
set -euo pipefail

N=${N:-5000}                    # phantoms (train ~88 %, val ~5 %, test ~7 %)
STEPS=${STEPS:-1000}
EVERY=${EVERY:-50}
PRESETS=${PRESETS:-"full convirt"}
SEEDS=${SEEDS:-"0"}
NPROC=${NPROC:-2}
EVAL_SPLIT=${EVAL_SPLIT:-val}   # the curves choose a budget: validation phantoms; test for the final claims
# twins (the twin phantoms of the test split, made below when named) needs EVAL_SPLIT=test:
#   TASKS="[structure,retrieval,zeroshot,twins]" EVAL_SPLIT=test bash docs/results/learning-curve/run.sh
TASKS=${TASKS:-"[structure,retrieval,zeroshot]"}
ROOT=${ROOT:-runs/learning-curve}
OUT=${OUT:-docs/results/learning-curve}
PY=${PY:-python}
EXTRA=${EXTRA:-}                # more `--set k=v` for every run, e.g. "--set loss.twin_negatives=true"

corpus=$ROOT/corpus
shards=$ROOT/shards
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}

# -- data: once, shared by every configuration (the same seed 0 as the demo) ----------------------
[ -f "$corpus/summary.json" ] || $PY -m pertvl data phantom --n "$N" --seed 0 --size 128 --out "$corpus" --nli
[ -f "$corpus/perturbations.jsonl" ] || $PY -m pertvl perturb --pairs "$corpus/pairs.jsonl" \
    --out "$corpus/perturbations.jsonl" --seed 0 --antonyms paper
[ -f "$corpus/counterfactuals.jsonl" ] || $PY -c "
from pertvl.data.counterfactual import write_counterfactuals
write_counterfactuals('$corpus/pairs.jsonl', '$corpus/counterfactuals.jsonl', 0)"
[ -f "$shards/manifest.json" ] || $PY -m pertvl pack --pairs "$corpus/pairs.jsonl" \
    --perturbations "$corpus/perturbations.jsonl" --counterfactuals "$corpus/counterfactuals.jsonl" \
    --out "$shards" --image-size 128 --maxcount 64 --workers 2

case "$TASKS" in *twins*)
  [ -f "$shards/twins/manifest.json" ] || $PY -m pertvl data twins --corpus "$corpus" --out "$ROOT/twins" \
      --shards "$shards/twins" --image-size 128 ;;
esac

# -- the runs --------------------------------------------------------------------------------------
runs=()
for seed in $SEEDS; do
  for preset in $PRESETS; do
    run=$ROOT/$preset-s$seed
    runs+=("$preset-s$seed=$run")
    [ -f "$run/final/config.json" ] && continue
    start=$(date +%s)
    # shellcheck disable=SC2086  # EXTRA is a list of words
    $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m pertvl train \
      --config configs/demo.yaml --shards "$shards" --out "$run" --seed "$seed" --max-steps "$STEPS" \
      --resume latest --set loss.preset="$preset" \
      --set train.eval_every="$EVERY" --set train.eval_split="$EVAL_SPLIT" --set train.eval_tasks="$TASKS" \
      --set train.checkpoint_every="$EVERY" --set train.keep_last=100000 \
      --set wandb.name="curve-$preset-s$seed" $EXTRA
    echo "$preset seed $seed: $(( $(date +%s) - start )) s wall" | tee -a "$ROOT/wall_times.txt"
  done
done

# -- the figure, the JSON and the table ------------------------------------------------------------
$PY -m pertvl report curves "${runs[@]}" --out "$OUT"
