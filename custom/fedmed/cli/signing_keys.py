#!/usr/bin/env python
"""Signing keys of the federation (ML-DSA-65 + Ed25519, see custom/fedmed/security/signing.py).

    fedmed-signing-keys generate KIT SITE           make KIT/local/fedmed_signing.{key,pub} (install does it)
    fedmed-signing-keys export KIT [--out FILE]      print (or write) the kit's public key bundle
    fedmed-signing-keys install-site SERVER_KIT BUNDLE [--site S] [--replace]
                                                                a hospital's bundle -> SERVER_KIT/local/site_keys/S.pub
    fedmed-signing-keys install-server KIT BUNDLE [--replace]
                                                                the server's bundle -> KIT/local/server_signing.pub

Carry bundles out of band (e.g. with the startup kits) and compare the printed fingerprint by phone or letter:
whoever can swap a bundle on its way can sign as that site.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmed.security import signing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("kit", type=Path)
    g.add_argument("site")
    e = sub.add_parser("export")
    e.add_argument("kit", type=Path)
    e.add_argument("--out", type=Path)
    s = sub.add_parser("install-site")
    s.add_argument("server_kit", type=Path)
    s.add_argument("bundle", type=Path)
    s.add_argument("--site", help="the hospital the bundle must belong to (default: the one it names)")
    s.add_argument("--replace", action="store_true", help="replace a different key installed for that site")
    v = sub.add_parser("install-server")
    v.add_argument("kit", type=Path)
    v.add_argument("bundle", type=Path)
    v.add_argument("--replace", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.cmd == "generate":
            keys = signing.generate_site_keys(a.kit / "local", a.site)
            print(f"{a.site}: signing keys in {a.kit / 'local'}; fingerprint {keys.fingerprint.hex()}")
        elif a.cmd == "export":
            keys = signing.load_public_keys(a.kit / "local" / signing.PUBLIC_FILE)
            if a.out:
                a.out.write_text(keys.to_json())
            else:
                sys.stdout.write(keys.to_json())
            print(f"{keys.site}: fingerprint {keys.fingerprint.hex()}", file=sys.stderr)
        elif a.cmd == "install-site":
            site = a.site or signing.load_public_keys(a.bundle).site
            if site == "server":
                raise signing.KeyFileError("that is the server's bundle: use install-server on a hospital kit")
            dest = signing.install_public_keys(
                a.bundle, signing.site_key_path(a.server_kit / "local", site), site, a.replace
            )
            print(f"installed {site}'s key ({signing.load_public_keys(dest).fingerprint.hex()}) at {dest}")
        else:
            dest = signing.install_public_keys(a.bundle, a.kit / "local" / signing.SERVER_KEY_FILE, "server", a.replace)
            print(f"installed the server's key ({signing.load_public_keys(dest).fingerprint.hex()}) at {dest}")
    except (signing.KeyFileError, OSError) as err:
        print(f"{a.cmd} failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
