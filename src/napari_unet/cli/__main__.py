"""``python -m napari_unet.cli ARGS``: the ``napari-unet`` command."""

import sys

from . import main

sys.exit(main())
