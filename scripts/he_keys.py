#!/usr/bin/env python
"""CKKS keys for selective HE, made by one hospital (the key custodian), never at provisioning:

    python scripts/he_keys.py make --out DIR
(logic and the hand-over in fedmed.crypto.keys)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "custom"))

from fedmed.crypto.keys import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
