"""Train a small CNN on MNIST and watch it learn (see `python runner.py --help`)."""

import sys

from exigo.cli import main

if __name__ == "__main__":
    sys.exit(main())
