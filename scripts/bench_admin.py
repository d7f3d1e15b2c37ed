#!/usr/bin/env python
"""fedmed.cli.bench_admin: see its --help. Run with the venv's Python, where fedmed is installed."""

import sys

from fedmed.cli.bench_admin import main

if __name__ == "__main__":
    sys.exit(main())
