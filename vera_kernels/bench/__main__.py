"""``python -m vera_kernels.bench``: see vera_kernels.bench."""

import sys

from .cli import main

sys.exit(main())
