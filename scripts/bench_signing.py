#!/usr/bin/env python
"""`python scripts/bench_signing.py ...` runs fedmed.cli.bench_signing (Benchmark: what hybrid ML-DSA-65 + Ed25519 signatures cost per DenseNet-121 upda...; see --help)."""

import sys

from fedmed.cli.bench_signing import main

if __name__ == "__main__":
    sys.exit(main())
