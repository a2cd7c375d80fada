#!/usr/bin/env python
"""Entry point of the token-reduction benchmark: see ``bench/cli.py`` or ``python run_bench.py --help``."""
import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
