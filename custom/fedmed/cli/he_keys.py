"""`fedmed-he-keys make --out DIR`: a fresh CKKS key set, made by one hospital (the key custodian), never at
provisioning. The keys and the hand-over are fedmed.security.he_keys."""

import argparse
import sys
from pathlib import Path

from fedmed.security import he_keys
from fedmed.security.he_keys import CLIENT_CONTEXT_FILE, HOSPITALS_DIR, SERVER_CONTEXT_FILE, SERVER_DIR, make_key_set


def main(argv=None) -> int:
    """scripts/he_keys.py: make --out DIR (the key custodian, at its hospital)."""
    p = argparse.ArgumentParser(description=he_keys.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    make = sub.add_parser("make", help="make a fresh CKKS key set (run by the key custodian, on its own machine)")
    make.add_argument("--out", type=Path, required=True, help="folder to write server/ and hospitals/ into")
    a = p.parse_args(argv)
    try:
        keys = make_key_set(a.out)
    except (FileExistsError, OSError) as e:
        print(f"he_keys: {e}", file=sys.stderr)
        return 1
    print(
        f"key set {keys.key_id[:12]} written to {a.out}:\n"
        f"  {a.out / SERVER_DIR / SERVER_CONTEXT_FILE}: no secret key; give it to the FL admin, who installs\n"
        f"      it with site_configs/install.sh <server kit> server --he-context <that file>\n"
        f"  {a.out / HOSPITALS_DIR}/: THE SECRET KEY; hand it to each hospital's IT out of band (never through the\n"
        f"      FL server or its admin), who installs it with\n"
        f"      site_configs/install.sh <kit> <site> --he-context <folder>/{CLIENT_CONTEXT_FILE}"
    )
    return 0
