"""``python -m pyroflows``: the console script."""

import sys

from pyroflows.cli import main

if __name__ == "__main__":
    sys.exit(main())
