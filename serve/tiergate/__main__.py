"""`python -m tiergate` is the `tiergate` command."""

import sys

from tiergate.cli import main

if __name__ == "__main__":
    sys.exit(main())
