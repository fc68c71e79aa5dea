"""`python -m convert ...` is the same as the `sdxl-convert` console script."""

import sys

from convert.cli import main

sys.exit(main())
