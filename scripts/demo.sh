#!/usr/bin/env bash
# Install what is missing, then run the main job: napari with the sample nuclei, the
# bundled model and the napari-unet widgets docked, one prediction shown. Without a
# display it runs the same pipeline headless under Xvfb and writes labels.tif,
# probabilities.tif and screenshot.png to ./demo-output. Extra arguments go to
# `napari-unet demo` (e.g. --output DIR, -m model.safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ]; then
  exec .venv/bin/napari-unet demo "$@"
fi
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/napari-unet demo --headless "$@"
