#!/usr/bin/env python
"""A hospital's lifetime privacy ledger, for its privacy officer: show every charge, or verify the chain.

    python scripts/privacy_ledger.py show   <kit>/local/privacy_ledger.jsonl
    python scripts/privacy_ledger.py verify <kit>/local/privacy_ledger.jsonl
(logic in fedmed.cli.privacy_ledger)
"""

import sys

from fedmed.cli.privacy_ledger import main

if __name__ == "__main__":
    sys.exit(main())
