#!/usr/bin/env python
"""CKKS keys for selective HE, made by one hospital (the key custodian), never at provisioning:

    python scripts/he_keys.py make --out DIR
(fedmed.cli.he_keys; the keys and the hand-over in fedmed.security.he_keys)
"""

import sys

from fedmed.cli.he_keys import main

if __name__ == "__main__":
    sys.exit(main())
