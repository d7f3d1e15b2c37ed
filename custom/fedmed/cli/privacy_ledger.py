"""The privacy officer's view of a site's lifetime privacy ledger (fedmed-privacy-ledger / scripts/privacy_ledger.py).

fedmed-privacy-ledger show   <kit>/local/privacy_ledger.jsonl   every charge; each dataset's most-charged image/patient
fedmed-privacy-ledger verify <kit>/local/privacy_ledger.jsonl   exit 0 if the ledger is whole, 1 naming the problem

The ledger's key, head file and identity index sit beside it (privacy_ledger.key, .head, .identities/); --key names
the key elsewhere (e.g. a copy the officer keeps).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from fedmed.privacy.accounting import epsilon_of
from fedmed.privacy.ledger import FORMAT, LEGACY_FORMAT, LedgerError, PrivacyLedger
from fedmed.privacy.policy import DEFAULT_DELTA


def _describe(ledger: PrivacyLedger, entry) -> str:
    if entry.format == LEGACY_FORMAT:
        return "format 1, keyed on file bytes: counted against every image"
    return ledger.identity_set(entry.dataset).describe()


def render(ledger: PrivacyLedger) -> str:
    entries = ledger.entries()  # raises LedgerError on a damaged file
    spend = ledger.spend(entries)
    keyed = sum(e.format == FORMAT for e in entries)
    out = [f"privacy ledger {ledger.path}: {len(entries)} entries ({keyed} keyed), head {ledger.head()}"]
    worst = 0.0
    for dataset in dict.fromkeys(e.dataset for e in entries):
        mine = [e for e in entries if e.dataset == dataset]
        delta = min(e.delta for e in mine)
        jobs = list(dict.fromkeys((e.job_id, e.details.get("run", "")) for e in mine))
        if mine[0].format == LEGACY_FORMAT:
            lifetime = epsilon_of([h for e in spend.legacy for h in e.history], delta)
        else:
            lifetime = spend.worst(ledger.identity_set(dataset), delta)[0]
        worst = max(worst, lifetime)
        ceiling = mine[-1].lifetime_ceiling
        out.append(
            f"\ndataset {dataset[:16]} ({_describe(ledger, mine[0])}): {len(jobs)} job(s), lifetime epsilon of its "
            f"most-charged image or patient {lifetime:.4f} at delta {delta:g} (ceiling {ceiling if ceiling is not None else 'none'})"
        )
        out.append(
            f"  {'seq':>4} {'recorded (UTC)':19} {'job (run)':36} {'round':>5} {'mechanism':10} "
            f"{'sigma':>8} {'q':>7} {'steps':>6} {'eps after':>9}"
        )
        for e in mine:
            when = datetime.fromtimestamp(e.recorded_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            job = f"{e.job_id} ({e.details['run']})" if e.details.get("run") else e.job_id
            # the ledger stores NVFlare's wire round (from 0); shown from 1, as in the record, logs and report
            lead = f"  {e.seq:>4} {when:19} {job[:36]:36} {e.round + 1:>5} {e.mechanism:10} "
            if e.replay_of is not None:
                out.append(f"{lead}{'resumed run: charged at entry ' + str(e.replay_of) + ', not again':>33}")
            for s, q, n in e.history:
                out.append(f"{lead}{s:>8.4f} {q:>7.4f} {n:>6} {e.epsilon_after:>9.4f}")
        user = [e for e in mine if e.mechanism == "user_level" and e.history]
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
    if entries:
        out.append(f"\nmost-charged image or patient across the ledger: epsilon {worst:.4f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("show", "verify"))
    p.add_argument("ledger", type=Path, help="the site's privacy_ledger.jsonl (in its kit's local/)")
    p.add_argument("--key", type=Path, default=None, help="the ledger's key (default: privacy_ledger.key beside it)")
    a = p.parse_args(argv)
    ledger = PrivacyLedger(a.ledger, key_path=a.key)
    if not a.ledger.is_file():
        # A missing ledger whose head file or key survives was deleted: say so rather than "no ledger".
        problem = ledger.verify() if ledger.heads_path.exists() or ledger.key_path.exists() else None
        print(f"DAMAGED: {problem}" if problem else f"no ledger at {a.ledger}", file=sys.stderr)
        return 1 if problem else 2
    if a.command == "verify":
        problem = ledger.verify()
        if problem:
            print(f"DAMAGED: {problem}", file=sys.stderr)
            return 1
        entries = ledger.entries()
        keyed = sum(e.format == FORMAT for e in entries)
        print(f"ok: {len(entries)} entries chained ({keyed} keyed), head {ledger.head()}")
        return 0
    try:
        print(render(ledger))
    except LedgerError as e:
        print(f"DAMAGED: {e}", file=sys.stderr)
        return 1
    return 0
