#!/usr/bin/env python
"""A hospital's lifetime privacy ledger, for its privacy officer: show every charge, or verify the chain.

    python scripts/privacy_ledger.py show   <kit>/local/privacy_ledger.jsonl
    python scripts/privacy_ledger.py verify <kit>/local/privacy_ledger.jsonl
(logic in fedmed.privacy.ledger_cli)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "custom"))

from fedmed.privacy.ledger_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
