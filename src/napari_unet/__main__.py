"""``python -m napari_unet ARGS``: the ``napari-unet`` command."""

import sys

from .cli import main

sys.exit(main())
