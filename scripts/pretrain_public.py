#!/usr/bin/env python
"""`python scripts/pretrain_public.py ...` = `fedmed-pretrain-public ...` (fedmed.cli.pretrain_public, see --help); run with the venv's Python."""

import sys

from fedmed.cli.pretrain_public import main

if __name__ == "__main__":
    sys.exit(main())
