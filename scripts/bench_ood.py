#!/usr/bin/env python
"""`python scripts/bench_ood.py ...` runs fedmed.cli.bench_ood (How well the out-of-distribution guard (fedmed.inference.ood) separates the imag...; see --help)."""

import sys

from fedmed.cli.bench_ood import main

if __name__ == "__main__":
    sys.exit(main())
