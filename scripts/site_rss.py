#!/usr/bin/env python
"""`python scripts/site_rss.py ...` runs fedmed.cli.site_rss (The simulated sites' resident memory per round, measured from outside their proc...; see --help)."""

import sys

from fedmed.cli.site_rss import main

if __name__ == "__main__":
    sys.exit(main())
