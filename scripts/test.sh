#!/usr/bin/env bash
# Install what is missing, then run the whole test suite under a virtual X server
# (napari needs OpenGL; Mesa draws in software). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest -ra "$@"
