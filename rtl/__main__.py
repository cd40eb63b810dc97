"""``python -m rtl``: the rtl command line (see :mod:`rtl.cli`)."""

import sys

from .cli import main

sys.exit(main())
