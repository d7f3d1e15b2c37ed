#!/usr/bin/env python
"""`python scripts/infer.py ...` = `fedmed-infer ...` (fedmed.cli.infer, see --help); run with the venv's Python."""

import sys

from fedmed.cli.infer import main

if __name__ == "__main__":
    sys.exit(main())
