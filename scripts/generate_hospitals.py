#!/usr/bin/env python
"""`python scripts/generate_hospitals.py ...` = `fedmed-generate-hospitals ...` (fedmed.cli.generate_hospitals, see --help); run with the venv's Python."""

import sys

from fedmed.cli.generate_hospitals import main

if __name__ == "__main__":
    sys.exit(main())
