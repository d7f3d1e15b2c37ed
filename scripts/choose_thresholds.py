#!/usr/bin/env python
"""`python scripts/choose_thresholds.py ...` = `fedmed-choose-thresholds ...` (fedmed.cli.choose_thresholds, see --help); run with the venv's Python."""

import sys

from fedmed.cli.choose_thresholds import main

if __name__ == "__main__":
    sys.exit(main())
