#!/usr/bin/env python
"""`python scripts/federation.py ...` = `fedmed-federation ...` (fedmed.cli.federation, see --help); run with the venv's Python."""

import sys

from fedmed.cli.federation import main

if __name__ == "__main__":
    sys.exit(main())
