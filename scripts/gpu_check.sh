#!/usr/bin/env bash
# One command on a bare machine with an NVIDIA GPU and a CUDA torch (no network): the CUDA
# tests and the GPU benchmark, one table, results under $OUT (or bench/results/).
#   device tool:  run  command="bash scripts/gpu_check.sh"  carry=[".whl"]  timeout_s=480
# Python packages the GPU image lacks (dask, zarr, numcodecs, ...) travel as wheels in .whl/
# (made here by scripts/gpu_wheels.sh); the package itself runs from src/ (no install).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD/bench:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NAPARI_UNET_RUNTIME=torch
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
echo "== CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -k "cuda" tests/test_tiling.py tests/test_backends.py tests/test_training.py \
  || status=1
echo "== GPU benchmark"
timeout 330 $PY bench/gpu.py --huge 16384 || status=1
if [ -n "${OUT:-}" ]; then cp bench/results/gpu.json "$OUT/" 2>/dev/null || true; fi
exit $status
