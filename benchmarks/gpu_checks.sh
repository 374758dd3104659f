#!/usr/bin/env bash
# The checks that need a GPU, in one go (GPU time is scarce, so one script runs them all): the CUDA tests, the
# synchronisation profile, and the GPU benchmarks. Run from the repository root on a machine with CUDA and this
# repository's packages:
#
#     OUT=/tmp/gpu bash benchmarks/gpu_checks.sh            # results and the log land in $OUT
#
# captum and grad-cam (the peers benchmark) may come from a folder of installed wheels: SITE=.gpu_site.
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the results}
export PYTHONPATH="$PWD${SITE:+:$PWD/$SITE}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/gpu_checks.log"
status=0
exec > >(tee "$log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "==> pytest tests/test_cuda.py"
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py || status=1
echo "==> python -m benchmarks.profile_sync"
"$PY" -m benchmarks.profile_sync --models vgg16_bn vit_b_16 --batch 64 --out "$OUT/sync-cuda.json" || status=1
echo "==> python -m benchmarks.run_all"
# a partial rerun merges into the run summary it finds in the out-dir
[ -f benchmarks/results/run-cuda.json ] && cp benchmarks/results/run-cuda.json "$OUT/"
"$PY" -m benchmarks.run_all --device cuda --models vgg16_bn vit_b_16 --batch 64 --chunk 5 --perturbation-batch 8 --reps 5 \
    --only ${BENCHMARKS:-methods peers targets} --out-dir "$OUT" --max-load 1000 || status=1
exit $status
