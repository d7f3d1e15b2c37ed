#!/usr/bin/env python
"""`python scripts/signing_keys.py ...` = `fedmed-signing-keys ...` (fedmed.cli.signing_keys, see --help)."""

import sys

from fedmed.cli.signing_keys import main

if __name__ == "__main__":
    sys.exit(main())
