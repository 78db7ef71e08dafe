"""`python -m sgl_diffusion.cli` (same as the `sgl-diffusion` command)."""

import sys

from . import main

sys.exit(main())
