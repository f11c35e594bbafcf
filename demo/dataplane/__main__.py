"""``python -m demo.dataplane``: the command line is :mod:`demo.dataplane.cli`."""

import sys

from demo.dataplane.cli import main

if __name__ == "__main__":
    sys.exit(main())
