#!/usr/bin/env python
"""`python scripts/submit_job.py ...` = `fedmed-submit ...` (fedmed.cli.submit_job, see --help); run with the venv's Python."""

import sys

from fedmed.cli.submit_job import main

if __name__ == "__main__":
    sys.exit(main())
