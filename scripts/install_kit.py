#!/usr/bin/env python
"""`python scripts/install_kit.py ...` = `fedmed-install-kit ...` (fedmed.cli.install_kit, see --help); run with the venv's Python."""

import sys

from fedmed.cli.install_kit import main

if __name__ == "__main__":
    sys.exit(main())
