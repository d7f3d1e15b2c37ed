#!/usr/bin/env python
"""`python scripts/bench_learning.py ...`: does federation pay? (fedmed.cli.bench_learning, see --help)."""

import sys

from fedmed.cli.bench_learning import main

if __name__ == "__main__":
    sys.exit(main())
