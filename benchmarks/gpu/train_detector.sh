#!/usr/bin/env bash
# Issue 30's GPU detector runs (rule written first: benchmarks/results/gpu_detector/rule.txt), made for the device
# machine of a session (PyTorch, timm, scipy, safetensors, ...; no datasets):
#   .gpu/datasets - benchmarks/pack_detection_datasets.py's copy of the four datasets (train and val splits)
# Two runs side by side, each with half the CPU cores drawing crops: W (ShuffleNetV2 1.5x from random weights) and L
# (`default` fine-tuned, precise's network); RUNS picks some of them, c continues a W run from INIT. A timing run of
# each comes first, two epochs of SPEED_STEPS steps: the second, warm one is timed (the first's steps include the
# start-up, which made the first runs of 2026-12-04 too short); the real runs' steps per epoch are then sized to
# BUDGET seconds (ITERS: given instead, no timing runs). Each run keeps its best epoch (best.safetensors) whenever it
# is stopped. Results go to $OUT.
#   BUDGET=380 DEVICE=cuda WORKERS=7 bash benchmarks/gpu/train_detector.sh
set -uo pipefail
BUDGET=${BUDGET:-380}; DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-7}; EPOCHS=${EPOCHS:-12}
STOP_AFTER=${STOP_AFTER:-480}; SPEED_STEPS=${SPEED_STEPS:-30}
# WORK under OUT: a run stopped by the call's limit still comes back
OUT=${OUT:-/tmp/detector_out}; WORK=${WORK:-$OUT/work}; PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; nproc --all  # (plain nproc obeys OMP_NUM_THREADS)
D=.gpu/datasets
DATA=(--dataset brcam2c=$D/brcam2c --dataset crchisto=$D/crchisto --dataset consep=$D/consep --dataset monuseg=$D/monuseg
      --mpp 0.33 --sampling dataset --randstainna 0.5 --scale-jitter 0.1 --one-to-one-matching --batch-size 32
      --device "$DEVICE" --workers "$WORKERS" --threads 2 --quiet)
# c: W continued, from INIT (a W run's best.safetensors), at half W's learning rate
declare -A RECIPE=([w]="--backbone shufflenet_v2_x1_5 --lr 2e-3" [l]="--init default --lr 6e-4" [c]="--init ${INIT:-} --lr 1e-3")
RUNS=${RUNS:-w l}  # which of them; one alone gets every worker
start=$(date +%s)
for run in ${ITERS:+none} $RUNS; do  # ITERS given: no speed runs
  [ "$run" = none ] && break
  $PY -m denuc.cli train-detector "${DATA[@]}" ${RECIPE[$run]} --epochs 2 --iters-per-epoch $SPEED_STEPS --warmup-iters 10 \
      --run-dir "$WORK/speed_$run" --overwrite > "$WORK/speed_$run.txt" 2>&1 &
done
wait
echo "speed runs: $(( $(date +%s) - start )) s"; tail -n 3 "$WORK"/speed_*.txt
iters() {  # steps per epoch that fit BUDGET seconds, validations included
  $PY -c "import json; r = json.load(open('$1/log.json'))[-1]; step = (r['seconds'] - r['val_seconds']) / $SPEED_STEPS
print(max(10, int(($BUDGET - $EPOCHS * r['val_seconds']) / $EPOCHS / step)))"
}
start=$(date +%s)
for run in $RUNS; do
  steps=${ITERS:-$(iters "$WORK/speed_$run")} || exit 1
  echo "$run: iters per epoch $steps"
  timeout "$STOP_AFTER" $PY -m denuc.cli train-detector "${DATA[@]}" ${RECIPE[$run]} --epochs "$EPOCHS" \
      --iters-per-epoch "$steps" --warmup-iters 100 --run-dir "$WORK/$run" --overwrite > "$WORK/$run.txt" 2>&1 &
done
wait
echo "runs: $(( $(date +%s) - start )) s"
for run in $RUNS; do
  rm -rf "$WORK/speed_$run" "$WORK/$run"/{last.pt,log.csv,stain_templates.json}  # the call returns only a few files
  tail -n 2 "$WORK/$run.txt"; $PY -c "import json; [print(r['epoch'], round(r['seconds']), r.get('val_f1_mean')) for r in json.load(open('$WORK/$run/log.json'))]"
done
