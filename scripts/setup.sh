#!/usr/bin/env bash
# Install what is missing on a fresh Debian machine with Python 3.11 (idempotent):
# the system libraries napari needs (OpenGL/Mesa, Xvfb, Qt's xcb), a virtual
# environment in .venv, the pinned CPU build of torch, and this package with its
# testing and benchmark extras.
#   TORCH_SPEC   torch requirement to install first (default: torch==2.13.0, CPU build)
#   PYTHON       interpreter for the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-icccm4 \
libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1"
missing=""
for p in $APT_PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  echo "setup: installing system packages:$missing"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
# napari 0.9 deprecates PyQt5: the testing extra brings PyQt6; an older venv's PyQt5 would
# still be picked first by qtpy, so it goes.
if .venv/bin/python -c "import PyQt5" >/dev/null 2>&1; then
  echo "setup: removing PyQt5 (Qt6 is used)"
  "${PIP[@]}" uninstall -y PyQt5 PyQt5-Qt5 PyQt5-sip >/dev/null
fi
echo "setup: installing napari-unet (editable) with testing, bench and bioimageio extras"
"${PIP[@]}" install -e ".[testing,bench,bioimageio]"
.venv/bin/python -c "import napari_unet, torch; print('setup: ok, torch', torch.__version__)"
