#!/usr/bin/env python
"""`python scripts/bench_aggregation.py ...` runs fedmed.cli.bench_aggregation (Benchmark: FedAvg vs our geometric median vs the `geom-median` reference on Dens...; see --help)."""

import sys

from fedmed.cli.bench_aggregation import main

if __name__ == "__main__":
    sys.exit(main())
