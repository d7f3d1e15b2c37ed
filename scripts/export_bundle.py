#!/usr/bin/env python
"""`python scripts/export_bundle.py ...` = `fedmed-export-bundle ...` (fedmed.cli.export_bundle, see --help); run with the venv's Python."""

import sys

from fedmed.cli.export_bundle import main

if __name__ == "__main__":
    sys.exit(main())
