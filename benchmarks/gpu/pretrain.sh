#!/usr/bin/env bash
# Issue 32's GPU pretraining run (rule written first: benchmarks/results/pretrain/rule_gpu.txt), made for the
# device machine of a session (a bare image with PyTorch, timm, safetensors, ...; no OpenSlide, no datasets):
#   .gpu/images  - benchmarks/pack_pretraining_images.py's train-split images (labels dropped)
#   .gpu/slides  - the unlabelled slides with a stated pixel size (CMU-1-Small-Region.svs)
#   .whl         - openslide-python and openslide-bin wheels
# It measures the seconds per step in a 30-step run first (which also finds and caches the nuclei), then sizes
# the real run's epochs to BUDGET seconds of steps, so that it ends inside the machine's time; a run stopped
# early still leaves the teacher's encoder of its last finished epoch. Results go to $OUT.
#   BUDGET=330 DEVICE=cuda WORKERS=14 bash benchmarks/gpu/pretrain.sh   (FROM_BACKBONE= : from random weights)
set -uo pipefail
FROM_BACKBONE=${FROM_BACKBONE-1}; BUDGET=${BUDGET:-330}; DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-14}; EPOCHS=${EPOCHS:-10}
OUT=${OUT:-/tmp/pretrain_out}; WORK=${WORK:-/tmp/pretrain_work}
mkdir -p "$OUT" "$WORK"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" .whl/*.whl || exit 1
export PYTHONPATH="$PWD:$WORK/site" PYTHONUNBUFFERED=1
PY=${PY:-python3}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'bf16',
torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
nproc
$PY -m denuc.cli export-backbone default --out "$WORK/backbone.safetensors" --overwrite || exit 1
COMMON=(--images .gpu/images .gpu/slides --encoder torchvision:shufflenet_v2_x1_0 --layers maxpool,stage2,stage3,stage4
        ${FROM_BACKBONE:+--weights "$WORK/backbone.safetensors"} --device "$DEVICE" --workers "$WORKERS" --batch-size 128 --lr 2.5e-4
        --teacher-temp 0.04 --warmup-teacher-temp 0.04 --teacher-temp-warmup-epochs 0 --prototypes 4096 --quiet)
start=$(date +%s)
$PY -m denuc.cli pretrain "${COMMON[@]}" --run-dir "$WORK/speed" --overwrite --epochs 1 --iters-per-epoch 30 \
    --warmup-iters 10 || exit 1
echo "speed run (nuclei + 30 steps): $(( $(date +%s) - start )) s"
ITERS=$($PY -c "import json; s = json.load(open('$WORK/speed/log.json'))[-1]['seconds'] / 30
print(max(10, int($BUDGET / $EPOCHS / s)))")
echo "iters per epoch: $ITERS"
mkdir -p "$WORK/run" && cp "$WORK"/speed/nuclei_*.npz "$WORK/run/"
start=$(date +%s)
timeout "${STOP_AFTER:-480}" $PY -m denuc.cli pretrain "${COMMON[@]}" --run-dir "$WORK/run" --overwrite \
    --epochs "$EPOCHS" --iters-per-epoch "$ITERS" --warmup-iters "$ITERS"
echo "pretrain exit $? after $(( $(date +%s) - start )) s"
cp "$WORK"/run/encoder.safetensors "$WORK"/run/log.json "$WORK"/run/config.json "$OUT/"
cp "$WORK"/speed/log.json "$OUT/speed_log.json"
cat "$WORK"/run/log.json
