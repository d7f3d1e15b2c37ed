#!/usr/bin/env python
"""`python scripts/redteam_collusion.py ...` runs fedmed.cli.redteam_collusion (The colluding-attack red team (issue 28), measured run by run: each run (one att...; see --help)."""

import sys

from fedmed.cli.redteam_collusion import main

if __name__ == "__main__":
    sys.exit(main())
