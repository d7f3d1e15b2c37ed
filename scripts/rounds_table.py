#!/usr/bin/env python
"""`python scripts/rounds_table.py ...` = `fedmed-rounds ...` (fedmed.cli.rounds_table, see --help); run with the venv's Python."""

import sys

from fedmed.cli.rounds_table import main

if __name__ == "__main__":
    sys.exit(main())
