#!/usr/bin/env python
"""`python scripts/bench_robustness.py ...` runs fedmed.cli.bench_robustness (Benchmark: final global test AUROC of each aggregator with and without hostile h...; see --help)."""

import sys

from fedmed.cli.bench_robustness import main

if __name__ == "__main__":
    sys.exit(main())
