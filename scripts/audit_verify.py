#!/usr/bin/env python
"""`python scripts/audit_verify.py ...` = `fedmed-audit-verify ...` (fedmed.cli.audit_verify, see --help); run with the venv's Python."""

import sys

from fedmed.cli.audit_verify import main

if __name__ == "__main__":
    sys.exit(main())
