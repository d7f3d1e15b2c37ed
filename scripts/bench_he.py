#!/usr/bin/env python
"""`python scripts/bench_he.py ...` runs fedmed.cli.bench_he (Benchmark: one FL round's bytes on the wire and wall time with no HE, selective ...; see --help)."""

import sys

from fedmed.cli.bench_he import main

if __name__ == "__main__":
    sys.exit(main())
