"""The privacy officer's view of a site's lifetime privacy ledger (scripts/privacy_ledger.py show|verify).

privacy_ledger.py show   <kit>/local/privacy_ledger.jsonl   every charge, and each dataset's lifetime epsilon
privacy_ledger.py verify <kit>/local/privacy_ledger.jsonl   exit 0 if the chain is whole, 1 naming the bad line
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from fedmed.privacy.accounting import epsilon_of
from fedmed.privacy.ledger import LedgerError, PrivacyLedger
from fedmed.privacy.policy import DEFAULT_DELTA


def render(ledger: PrivacyLedger) -> str:
    entries = ledger.entries()  # raises LedgerError on a damaged file
    out = [f"privacy ledger {ledger.path}: {len(entries)} entries, head {ledger.head()}"]
    for dataset in dict.fromkeys(e.dataset for e in entries):
        mine = [e for e in entries if e.dataset == dataset]
        delta = min(e.delta for e in mine)
        jobs = list(dict.fromkeys((e.job_id, e.details.get("run", "")) for e in mine))
        lifetime = epsilon_of(PrivacyLedger.history_of(mine, dataset), delta)
        ceiling = mine[-1].lifetime_ceiling
        out.append(
            f"\ndataset {dataset}: {len(jobs)} job(s), lifetime epsilon {lifetime:.4f} at delta {delta:g}"
            f" (ceiling {ceiling if ceiling is not None else 'none'})"
        )
        out.append(
            f"  {'seq':>4} {'recorded (UTC)':19} {'job (run)':36} {'round':>5} {'mechanism':10} "
            f"{'sigma':>8} {'q':>7} {'steps':>6} {'eps after':>9}"
        )
        for e in mine:
            when = datetime.fromtimestamp(e.recorded_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            job = f"{e.job_id} ({e.details['run']})" if e.details.get("run") else e.job_id
            for s, q, n in e.history:
                # the ledger stores NVFlare's wire round (from 0); shown from 1, as in the record, logs and report
                out.append(
                    f"  {e.seq:>4} {when:19} {job[:36]:36} {e.round + 1:>5} {e.mechanism:10} {s:>8.4f} "
                    f"{q:>7.4f} {n:>6} {e.epsilon_after:>9.4f}"
                )
        user = [e for e in mine if e.mechanism == "user_level"]
        if user:
            # the site-level guarantee of the filter's rounds, for the relation each stated
            for relation in dict.fromkeys(e.details.get("relation", "replace") for e in user):
                hist = [
                    (e.details["noise_multiplier"], 1.0, 1)
                    for e in user
                    if e.details.get("relation", "replace") == relation
                ]
                out.append(
                    f"  user-level (whole-site, {relation}) epsilon over {len(hist)} round(s): "
                    f"{epsilon_of(hist, delta or DEFAULT_DELTA):.4f}"
                )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("show", "verify"))
    p.add_argument("ledger", type=Path, help="the site's privacy_ledger.jsonl (in its kit's local/)")
    a = p.parse_args(argv)
    if not a.ledger.is_file():
        print(f"no ledger at {a.ledger}", file=sys.stderr)
        return 2
    ledger = PrivacyLedger(a.ledger)
    if a.command == "verify":
        problem = ledger.verify()
        if problem:
            print(f"DAMAGED: {problem}", file=sys.stderr)
            return 1
        print(f"ok: {len(ledger.entries())} entries chained, head {ledger.head()}")
        return 0
    try:
        print(render(ledger))
    except LedgerError as e:
        print(f"DAMAGED: {e}", file=sys.stderr)
        return 1
    return 0
