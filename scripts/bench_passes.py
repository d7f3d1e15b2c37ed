#!/usr/bin/env python
"""`python scripts/bench_passes.py ...` runs fedmed.cli.bench_passes (Benchmark: the screening's per-update passes before and after fedmed.server.pass...; see --help)."""

import sys

from fedmed.cli.bench_passes import main

if __name__ == "__main__":
    sys.exit(main())
