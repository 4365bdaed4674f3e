#!/usr/bin/env bash
# Whole-slide prediction on a lent GPU (`bench_slide.py --device cuda`): the default bundle, in full and detection
# only, on the CMU-1 region and its 4x copy, PyTorch on the GPU, batches of BATCH tiles; what a user with a GPU gets.
# Carries .gpu/slides (CMU-1-Small-Region.svs) and .whl (openslide-python and openslide-bin wheels); the JSON goes
# to $OUT (its provenance has no git commit there: record the commit that was copied).
#   BATCH=32 bash benchmarks/gpu/bench_slide.sh          (DEVICE=cpu: the same here, to test the script)
set -euo pipefail
DEVICE=${DEVICE:-cuda}; BATCH=${BATCH:-32}; OUT=${OUT:-/tmp/slide_gpu}; WORK=${WORK:-/tmp/slide_work}; PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
if ! $PY -c "import openslide" 2> /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" .whl/*.whl
fi
export PYTHONPATH="$PWD:$WORK/site" PYTHONUNBUFFERED=1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$PY benchmarks/bench_slide.py --device "$DEVICE" --batch-size "$BATCH" --slide .gpu/slides/CMU-1-Small-Region.svs \
    --repeats 3 --out "$OUT/slide_$DEVICE.json"
