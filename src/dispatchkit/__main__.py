"""``python -m dispatchkit``."""

import sys

from dispatchkit.cli import main

sys.exit(main())
