#!/usr/bin/env bash
# One short run of each training command's GPU path (train-classifier frozen and full, tune-offsets, train-outlines),
# which until now has run on the CPU only: a few minutes of a lent GPU. Carries .gpu/datasets
# (benchmarks/pack_detection_datasets.py); each step's seconds and last log row are printed, the run folders go to $OUT.
#   DEVICE=cuda bash benchmarks/gpu/smoke_train.sh      (DEVICE=cpu: the same steps here, to test the script)
set -euo pipefail
DEVICE=${DEVICE:-cuda}; OUT=${OUT:-/tmp/gpu_smoke}; PY=${PY:-python3}; D=.gpu/datasets
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
step() {  # name, then the denuc command line
  local name=$1; shift
  local start=$(date +%s)
  $PY -m denuc.cli "$@" > "$OUT/$name.txt" 2>&1 || { tail -n 20 "$OUT/$name.txt"; exit 1; }
  echo "$name: $(( $(date +%s) - start )) s; $(tail -n 1 "$OUT/$name.txt")"
}
step frozen train-classifier --dataset brcam2c=$D/brcam2c --mode frozen --epochs 2 --device "$DEVICE" \
    --run-dir "$OUT/frozen" --overwrite --quiet
step full train-classifier --dataset brcam2c=$D/brcam2c --mode full --epochs 1 --iters-per-epoch 10 --offsets none \
    --device "$DEVICE" --run-dir "$OUT/full" --overwrite --quiet
step offsets tune-offsets "$OUT/frozen/model.safetensors" --dataset brcam2c=$D/brcam2c --out "$OUT/tuned.safetensors" \
    --overwrite --device "$DEVICE"
step outlines train-outlines --dataset consep=$D/consep --epochs 1 --iters-per-epoch 10 --device "$DEVICE" \
    --run-dir "$OUT/outlines" --overwrite --quiet
rm -f "$OUT"/*/last.pt "$OUT"/*/features_*.safetensors "$OUT"/*/detections_*.safetensors  # only a few files come back
