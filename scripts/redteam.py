#!/usr/bin/env python
"""`python scripts/redteam.py ...` = `fedmed-redteam ...` (fedmed.cli.redteam, see --help)."""

import sys

from fedmed.cli.redteam import main

if __name__ == "__main__":
    sys.exit(main())
