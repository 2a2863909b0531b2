"""``python -m dispatchkit``."""

import sys

try:
    from dispatchkit.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line is still being imported
    print("dispatchkit: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
