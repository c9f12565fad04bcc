"""python -m benchmarks.load --help (the same as `tiergate bench --help`)."""

import sys

from benchmarks.load.cli import main

if __name__ == "__main__":
    sys.exit(main())
