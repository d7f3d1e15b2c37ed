#!/usr/bin/env python
"""`python scripts/report.py ...` = `fedmed-report ...` (fedmed.cli.report, see --help); run with the venv's Python."""

import sys

from fedmed.cli.report import main

if __name__ == "__main__":
    sys.exit(main())
