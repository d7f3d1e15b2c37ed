#!/usr/bin/env python
"""`python scripts/bench_inference.py ...` runs fedmed.cli.bench_inference (Inference throughput on CPU: images/s of the batched forward pass per batch size...; see --help)."""

import sys

from fedmed.cli.bench_inference import main

if __name__ == "__main__":
    sys.exit(main())
