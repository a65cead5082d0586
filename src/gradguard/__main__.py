"""``python -m gradguard``: the command line (see :mod:`gradguard.cli`)."""

import sys

from .cli import main

sys.exit(main())
