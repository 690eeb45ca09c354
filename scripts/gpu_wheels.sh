#!/usr/bin/env bash
# Download, here, the wheels scripts/gpu_check.sh needs on the GPU machine (Python 3.12,
# x86-64, no network there) into .whl/ (git-ignored through .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  dask zarr numcodecs donfig crc32c partd locket toolz cloudpickle fsspec pyyaml \
  google-crc32c typing_extensions msgspec
ls -la .whl
