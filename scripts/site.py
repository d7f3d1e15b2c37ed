#!/usr/bin/env python
"""`python scripts/site.py ...` = `fedmed-site ...` (fedmed.cli.site, see --help); run with the venv's Python."""

import sys

from fedmed.cli.site import main

if __name__ == "__main__":
    sys.exit(main())
