"""The colluding-attack red team (issue 28), measured run by run: each run (one attack, one seed, one set of round
rules) is written to --runs as JSON as soon as it finishes, so a cut run keeps what it measured, and a rerun skips
what is there. `--doc` regenerates docs/redteam_collusion.md from the JSON alone.

    python scripts/redteam_collusion.py [--runs docs/redteam_collusion] [--budget-s 3600]
    python scripts/redteam_collusion.py --doc

Order (CPU is scarce; what matters first runs first): the honest run and the two-colluder rows on seed 0; the
honest runs on seeds 1 and 2; the accepted two-colluder ALIE (paper's z) and Min-Max inverse-std rows on seeds 1
and 2 (the paired gap), then centred clipping on the honest run and on those two rows (seed 0); the other accepted
two-colluder rows on seeds 1 and 2; the one-colluder rows likewise; plain FedAvg under the worst two-colluder
attack; centred clipping on seeds 1 and 2. A row whose attackers are rejected, quarantined or refused
in every round they attack holds on the reason (one seed); an accepted row needs its paired gap (attackers honest
vs attacking, same seed) over seeds 0, 1, 2. The federation is the red team's default (fedmed-redteam)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fedmed.job.tasks import CHEST_XRAY14
from fedmed.server.robust.trust import TrustPolicy
from fedmed.sim import redteam
from fedmed.sim.inprocess import Adversary, FederationPlan, federate

SEEDS = (0, 1, 2)
SIZE = dict(honest=4, per_site=100, num_test=200, rounds=4, attack_from=2, image_size=64, batch_size=16)
TOLERANCE = 0.02
# The vote cap tried (rules "gm+cap"): no site above 1.5x its count share (0.3 of 5 equal sites; a near-copy pair
# counted once, 0.375 together). The honest runs' weights stayed within 0.19-0.21, so it binds only on a favourite.
VOTE_CAP = 1.5
# "site X: distance D (xR median), head cosine +C, sign balance +B, body cosine +O, score ..." (RoundEngine's
# per-site log line)
LOG_LINE = re.compile(
    r"site (\S+): distance \S+ \(x([0-9.]+) median\)(?:, head cosine ([+-][0-9.]+))?(?:, sign balance ([+-][0-9.]+))?"
    r"(?:, body cosine ([+-][0-9.]+))?"
)
BLOCKED = ("rejected", "quarantined", "refused")


def key(row: str, seed: int, rules: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{rules} {row} s{seed}".lower()).strip("-")


def play(data, row, seed: int, rules: str, size: dict = SIZE) -> dict:
    """One federation: row None = every site honest. rules: "gm" (geometric median with trust, the default),
    "gm+cc" (and centred clipping), "gm+cap" (and TrustPolicy.vote_share_cap at VOTE_CAP), "gm+he" (the classifier layers encrypted, redteam.HE_LAYERS, as hospitals run
    it with HE on: the server never sees them), "fedavg" (plain FedAvg, no trust rule). size: SIZE or a larger
    federation (--per-site, --rounds, --image-size, --num-test)."""
    train, test = data
    hostile = {} if row is None else {s: row.attack for s in redteam.colluder_sites(row, list(train))}
    plan = FederationPlan(
        task=CHEST_XRAY14,
        rounds=size["rounds"],
        aggregation="fedavg" if rules == "fedavg" else "geometric_median",
        use_trust=rules != "fedavg",
        centred_clipping=rules == "gm+cc",
        batch_size=size["batch_size"],
        seed=seed,
        he_layers=redteam.HE_LAYERS if rules == "gm+he" else None,
        trust=TrustPolicy(vote_share_cap=VOTE_CAP) if rules == "gm+cap" else None,
    )
    rounds = []

    def on_round(report):
        per_site = {}
        for level, msg in report.log:
            m = LOG_LINE.match(msg)
            if m:
                per_site[m.group(1)] = {
                    "distance_ratio": float(m.group(2)),
                    "head_cosine": float(m.group(3)) if m.group(3) else None,
                    "sign_balance": float(m.group(4)) if m.group(4) else None,
                    "body_cosine": float(m.group(5)) if m.group(5) else None,
                }
        rounds.append(
            {
                "round": report.round_num + 1,
                "aggregated": report.aggregated,
                "problem": report.problem,
                "updates": {u.site: {"status": u.status, "reason": u.reason} for u in report.updates},
                "weights": {s: float(w) for s, w in report.weights.items()},
                "alerts": [[a.site, a.kind, a.message[:200]] for a in report.alerts],
                "sites": per_site,
            }
        )

    t0 = time.time()
    fed = federate(train, test, plan, Adversary(hostile, SIZE["attack_from"] - 1), on_round=on_round)
    return {
        "row": None if row is None else row.name,
        "kind": None if row is None else row.attack.kind,
        "factor": None if row is None else row.attack.factor,
        "colluders": 0 if row is None else row.colluders,
        "hostile": sorted(hostile),
        "seed": seed,
        "rules": rules,
        "auroc": float(fed.auroc),
        "stopped": fed.stopped,
        "rounds": rounds,
        "seconds": time.time() - t0,
        "size": size,
    }


def attacked_rounds(run: dict) -> list:
    return [r for r in run["rounds"] if r["round"] >= SIZE["attack_from"]]


def blocked_every_round(run: dict) -> bool:
    """Every attacked round: every attacker rejected/quarantined/refused with a reason (or the run stopped)."""
    rounds = attacked_rounds(run)
    return bool(rounds) and all(
        all(r["updates"][s]["status"] in BLOCKED and r["updates"][s]["reason"] for s in run["hostile"])
        for r in rounds
        if all(s in r["updates"] for s in run["hostile"])
    )


def honest_quarantined(run: dict) -> list:
    return sorted(
        {s for r in run["rounds"] for s, u in r["updates"].items() if u["status"] == "quarantined"}
        - set(run["hostile"])
    )


BEFORE = (
    "before-sign-rule"  # the runs measured before the sign rule (fedmed.server.robust.sign_balance), kept as measured
)
SIGN_OK, SIGN_BAD = TrustPolicy.sign_balance_ok, TrustPolicy.sign_balance_bad
IN_DISTRIBUTION = ("alie", "min_max_std", "min_sum_std")  # the kinds the geometric median accepted (issue 28)
# The adaptive attackers that know the sign rule (fedmed.sim.attacks.BALANCED), measured right after them.
ADAPTIVE = ("alie_balanced", "min_max_balanced")
# With HE on (rules "gm+he"), first the rows that only the direction rule caught with HE off (the body rule's
# targets: unit directions and IPM), with 1 and 2 colluders; then every other row.
HE_BODY_ROWS = (("min_max_unit", 1.0), ("min_sum_unit", 1.0), ("ipm", 0.5), ("ipm", 100.0))
HE_ROWS = HE_BODY_ROWS + tuple(
    (a.kind, a.factor) for _, a in redteam.COLLUDING if (a.kind, a.factor) not in HE_BODY_ROWS
)
# The HE-on runs measured before the body rule (fedmed.aggregation.body_cosine), kept as measured.
BEFORE_BODY = "before-body-rule"


def plan_jobs(runs: dict) -> list:
    """The next jobs, in priority order, given what is measured (some depend on seed 0's verdict): the honest run
    on seed 0, the in-distribution rows (seed 0: a row rejected every round holds on the reason) and the
    two-colluder adaptive rows (the attack on the sign rule), the honest runs on seeds 1 and 2, the other rows
    (seed 0); the accepted two-colluder adaptive rows on seeds 1 and 2 (their paired gap), then, for the worst
    adaptive pair not held, centred clipping on seeds 0-2; with HE on, the honest run and the HE_BODY_ROWS (the
    body rule's targets, two colluders then one; seed 0) and the honest runs on seeds 1 and 2; the one-hostile-site
    adaptive rows; every row still accepted on seeds 1 and 2 (HE-on body rows too); the other HE_ROWS (seed 0, then
    seeds 1 and 2 where accepted); plain FedAvg under the worst two-colluder attack. Centred clipping's runs on the
    other rows (before the sign rule) are kept in BEFORE, the HE-on runs before the body rule in BEFORE_BODY."""
    rows = sorted(redteam.COLLUSION_ROWS, key=lambda r: -r.colluders)
    lone_adaptive = [r for r in rows if r.attack.kind in ADAPTIVE and r.colluders == 1]
    first = [r for r in rows if r.attack.kind in IN_DISTRIBUTION + ADAPTIVE and r not in lone_adaptive]
    rest = [r for r in rows if r.attack.kind not in IN_DISTRIBUTION + ADAPTIVE]

    def accepted(row, rules="gm"):
        run = runs.get(key(row.name, 0, rules))
        return run is not None and not blocked_every_round(run)

    jobs = [(None, 0, "gm")] + [(r, 0, "gm") for r in first] + [(None, 1, "gm"), (None, 2, "gm")]
    jobs += [(r, 0, "gm") for r in rest]
    jobs += [
        (r, s, "gm") for r in rows if r.colluders == 2 and r.attack.kind in ADAPTIVE and accepted(r) for s in (1, 2)
    ]
    he = [r for r in rows if (r.attack.kind, r.attack.factor) in HE_ROWS]
    # Centred clipping (the existing time-coupled defence) against the worst adaptive pair not held (3 seeds).
    adaptive = [r for r in rows if r.colluders == 2 and r.attack.kind in ADAPTIVE and verdict(runs, r.name)[1] is False]
    if adaptive:
        worst = min(adaptive, key=lambda r: float(np.mean([g for _, g in gaps(runs, r.name, "gm", "gm")])))
        jobs += [(worst, s, "gm+cc") for s in SEEDS]
    he_body = [r for r in he if (r.attack.kind, r.attack.factor) in HE_BODY_ROWS]  # two colluders first (rows)
    jobs += [(None, 0, "gm+he")] + [(r, 0, "gm+he") for r in he_body] + [(None, s, "gm+he") for s in (1, 2)]
    jobs += [(r, 0, "gm") for r in lone_adaptive]
    jobs += [(r, s, "gm") for r in rows if accepted(r) for s in (1, 2)]
    # An HE row accepted on seed 0 is judged as the others: its paired gap over seeds 0-2, against HE-on honest runs.
    jobs += [(r, s, "gm+he") for s in (1, 2) for r in he_body if accepted(r, "gm+he")]
    jobs += [(r, 0, "gm+he") for r in he if r not in he_body]
    jobs += [(r, s, "gm+he") for s in (1, 2) for r in he if r not in he_body and accepted(r, "gm+he")]
    done2 = [runs[key(r.name, 0, "gm")] for r in rows if r.colluders == 2 and key(r.name, 0, "gm") in runs]
    if done2:  # plain FedAvg under the two-colluder attack that hurt the defended engine most
        worst = min(done2, key=lambda x: x["auroc"])
        row = next(r for r in rows if r.name == worst["row"])
        jobs += [(None, 0, "fedavg"), (row, 0, "fedavg")]
    return [j for j in jobs if key(j[0].name if j[0] else "honest", j[1], j[2]) not in runs]


def plan_larger(runs: dict) -> list:
    """The jobs at a larger size (issue 28 asks for an honest seed spread below 0.03): the honest run on seeds 0, 1,
    2 (the spread); then, once it is measured, the two in-distribution rows (ALIE at the paper's z, Min-Max
    inverse-std), the adaptive ALIE and the worst other row (Min-Max unit direction), two colluders, seed 0; every one
    of them still accepted on seeds 1 and 2."""
    jobs = [(None, s, "gm") for s in SEEDS]
    picked = {("alie", 0.0), ("min_max_std", 1.0), ("alie_balanced", 0.0), ("min_max_unit", 1.0)}
    rows = [r for r in redteam.COLLUSION_ROWS if r.colluders == 2 and (r.attack.kind, r.attack.factor) in picked]
    jobs += [(r, 0, "gm") for r in rows]
    for r in rows:
        run = runs.get(key(r.name, 0, "gm"))
        if run is not None and not blocked_every_round(run):
            jobs += [(r, s, "gm") for s in (1, 2)]
    return [j for j in jobs if key(j[0].name if j[0] else "honest", j[1], j[2]) not in runs]


def load_runs(folder: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def measure(a) -> None:
    torch.set_num_threads(1)
    a.runs.mkdir(parents=True, exist_ok=True)
    size = {**SIZE, "per_site": a.per_site, "rounds": a.rounds, "image_size": a.image_size, "num_test": a.num_test}
    names = redteam.make_sites(a.data, size["honest"], size["per_site"], seed=0, num_test=size["num_test"])
    train, test, _ = redteam.load_sites(a.data, names, size["image_size"])
    plan = plan_jobs if size == SIZE else plan_larger
    if a.remeasure:  # these runs again, in the order given, each overwriting its JSON (what the code does now)
        todo = remeasure_jobs(a.remeasure)
        plan = lambda runs: todo  # noqa: E731 (claim drops each as it goes: the list is consumed below)
    t_end = time.time() + a.budget_s
    while time.time() < t_end:
        job = claim(a.runs, plan(load_runs(a.runs)))
        if job is not None and a.remeasure:
            todo.remove(job[0])
        if job is None:
            break
        (row, seed, rules), name = job
        print(f"{time.strftime('%H:%M:%S')} {name}", flush=True)
        try:
            out = play((train, test), row, seed, rules, size)
            (a.runs / f"{name}.json").write_text(json.dumps(out, indent=1))
        finally:
            (a.runs / f"{name}.claim").unlink(missing_ok=True)
        print(f"  AUROC {out['auroc']:.3f} in {out['seconds']:.0f} s", flush=True)


def job_name(job) -> str:
    return key(job[0].name if job[0] else "honest", job[1], job[2])


def remeasure_jobs(names: list) -> list:
    """The jobs named (their JSON stems, e.g. gm-honest-s0), in that order; an unknown name is an error naming it."""
    rows = [None, *redteam.COLLUSION_ROWS]
    known = {
        job_name(j): j
        for j in ((r, s, x) for r in rows for s in SEEDS for x in ("gm", "gm+he", "gm+cc", "gm+cap", "fedavg"))
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--remeasure: no such run {unknown}; a run is named as its JSON file, e.g. gm-honest-s0")
    return [known[n] for n in names]


def claim(folder: Path, jobs: list):
    """The first job no other worker has claimed ((job, name), its NAME.claim file created), or None: two workers
    started on one --runs folder (each with its own --data copy) share the queue."""
    for job in jobs:
        name = key(job[0].name if job[0] else "honest", job[1], job[2])
        try:
            os.close(os.open(folder / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return job, name
    return None


def max_share(run: dict) -> float:
    """The attackers' largest share of the aggregate's weight over the attacked rounds."""
    return max(
        (sum(r["weights"].get(s, 0.0) for s in run["hostile"]) / (sum(r["weights"].values()) or 1.0))
        for r in attacked_rounds(run)
    )


def summary(run: dict) -> str:
    """What the server did with the attackers, per attacked round (seed 0's run)."""
    out = []
    for r in attacked_rounds(run):
        said = []
        for s in run["hostile"]:
            u = r["updates"].get(s)
            if u is None:
                continue
            reason = f" ({u['reason'][:150]})" if u["status"] in BLOCKED and u["reason"] else ""
            said.append(f"{s} {u['status']}{reason}")
        share = sum(r["weights"].get(s, 0.0) for s in run["hostile"]) / (sum(r["weights"].values()) or 1.0)
        held = "" if r["aggregated"] else f"; round not committed: {(r['problem'] or '')[:80]}"
        out.append(f"r{r['round']}: {' / '.join(said)}; attackers' weight {share:.2f}{held}")
    if run["stopped"]:
        out.append(f"run stopped: {run['stopped'][:80]}")
    return "<br>".join(x.replace("|", "/") for x in out)


def gaps(runs: dict, row: str, rules: str, honest_rules: str) -> list:
    """(seed, attacked AUROC minus the same seed's honest AUROC) for every seed measured both ways."""
    out = []
    for seed in SEEDS:
        a, h = runs.get(key(row, seed, rules)), runs.get(key("honest", seed, honest_rules))
        if a is not None and h is not None:
            out.append((seed, a["auroc"] - h["auroc"]))
    return out


def verdict(runs: dict, row: str, rules: str = "gm") -> tuple:
    """(verdict text, held: True / False / None = not measured enough) for one row under these rules."""
    first = runs.get(key(row, 0, rules))
    if first is None:
        return "not run", None
    quarantined = honest_quarantined(first)
    if quarantined:
        return f"**NO**: honest site(s) {', '.join(quarantined)} quarantined", False
    if blocked_every_round(first):
        return "yes: rejected with the reason in every round it attacked (seed 0)", True
    g = gaps(runs, row, rules, rules)
    text = ", ".join(f"s{s} {v:+.3f}" for s, v in g)
    if len(g) < len(SEEDS):
        return f"accepted; paired gaps {text or '-'}: fewer than 3 seeds, not judged", None
    mean = float(np.mean([v for _, v in g]))
    if mean >= -TOLERANCE:
        return f"yes: accepted, mean paired gap {mean:+.3f} ({text})", True
    return f"**NO**: accepted, mean paired gap {mean:+.3f} ({text}), below -{TOLERANCE}", False


def cosine_table(runs: list) -> list:
    """The honest sites' classifier cosines to the judging reference (the coordinate median of the sites) and
    their distance ratios, every round of every honest run."""
    cos = [
        v["head_cosine"]
        for r in runs
        for rd in r["rounds"]
        for v in rd["sites"].values()
        if v["head_cosine"] is not None
    ]
    ratio = [v["distance_ratio"] for r in runs for rd in r["rounds"] for v in rd["sites"].values()]
    if not cos:
        return ["No honest run measured yet."]
    q = np.percentile(cos, [0, 5, 50]).tolist()
    return [
        f"{len(cos)} (site, round) cosines over {len(runs)} run(s): min {q[0]:+.3f}, 5th percentile "
        f"{q[1]:+.3f}, median {q[2]:+.3f}; {sum(c < TrustPolicy.head_cosine_ok for c in cos)} below head_cosine_ok "
        f"({TrustPolicy.head_cosine_ok}), {sum(c <= TrustPolicy.head_cosine_bad for c in cos)} at or below "
        f"head_cosine_bad ({TrustPolicy.head_cosine_bad}). Distance ratios (to the median site's): max "
        f"{max(ratio):.2f} (TrustPolicy.ok_ratio {TrustPolicy.ok_ratio}, bad_ratio {TrustPolicy.bad_ratio}).",
    ]


def attacker_cosines(runs: dict) -> list:
    """The colluders' own classifier cosines in the attacked rounds, by whether seed 0 rejected them."""
    got = {True: [], False: []}
    for r in runs.values():
        if r["row"] is None or r["rules"] != "gm" or r["seed"] != 0:
            continue
        got[blocked_every_round(r)] += [
            rd["sites"][s]["head_cosine"]
            for rd in attacked_rounds(r)
            for s in r["hostile"]
            if s in rd["sites"] and rd["sites"][s]["head_cosine"] is not None
        ]
    out = []
    for blocked, what in ((True, "rejected/quarantined"), (False, "accepted")):
        if got[blocked]:
            out.append(
                f"The colluders of the {what} rows (seed 0, attacked rounds): cosines {min(got[blocked]):+.2f} to "
                f"{max(got[blocked]):+.2f}."
            )
    return [" ".join(out)] if out else []


def sign_table(runs: dict) -> list:
    """The sign rule's statistic (each site's sign balance minus the median site's, from the RoundEngine's log line):
    every honest site of every run, every round, against the attackers' in the attacked rounds."""
    honest, attackers = [], {}
    for r in runs.values():
        if r["rules"] != "gm":
            continue
        for rd in r["rounds"]:
            for s, v in rd["sites"].items():
                b = v.get("sign_balance")
                if b is None:
                    continue
                if s in r["hostile"] and rd["round"] >= SIZE["attack_from"]:
                    attackers.setdefault(r["row"], []).append(b)
                elif s not in r["hostile"]:
                    honest.append(b)
    if not honest:
        return ["No run with the sign rule measured yet."]
    out = [
        f"Honest sites (every site of the honest runs, the honest sites of the attacked ones, every round): "
        f"{len(honest)} (site, round) offsets over {sum(r['rules'] == 'gm' for r in runs.values())} run(s), "
        f"largest |offset| {max(abs(b) for b in honest):.3f} (TrustPolicy.sign_balance_ok {SIGN_OK} scores 1, "
        f"sign_balance_bad {SIGN_BAD} scores 0).",
        "",
    ]
    out += [f"- {row}: attackers' offsets {min(v):+.3f} to {max(v):+.3f}" for row, v in sorted(attackers.items())]
    return out


def adaptive_lines(runs: dict) -> list:
    """Per adaptive row: what the engine gave it (weight, distance ratio, status) over its runs, and its gaps."""
    out = []
    for row in (r for r in redteam.COLLUSION_ROWS if r.attack.kind in ADAPTIVE):
        mine = [runs[key(row.name, s, "gm")] for s in SEEDS if key(row.name, s, "gm") in runs]
        if not mine:
            continue
        statuses = sorted({rd["updates"][h]["status"] for r in mine for rd in attacked_rounds(r) for h in r["hostile"]})
        ratios = [rd["sites"][h]["distance_ratio"] for r in mine for rd in attacked_rounds(r) for h in r["hostile"]]
        g = gaps(runs, row.name, "gm", "gm")
        out.append(
            f"- {row.name}: {', '.join(statuses)} in every attacked round of {len(mine)} run(s); the attackers' "
            f"weight together at most {max(max_share(r) for r in mine):.2f}; their distance to the reference "
            f"{min(ratios):.2f}-{max(ratios):.2f}x the median site's; paired gaps "
            + ", ".join(f"s{s} {v:+.3f}" for s, v in g)
            + (f" (mean {np.mean([v for _, v in g]):+.3f})" if len(g) > 1 else "")
            + "."
        )
    if out:
        out += [
            "",
            "Held on the mean only: the paired gap is within 0.02 over seeds 0-2, but two of three seeds lie near or "
            "below -0.02, about what a rejected pair's lost data costs (seed 0: -0.025); nothing in the engine tells "
            "the balanced point from an honest one, and the honest seed spread at this size (0.095) is what decides "
            "the verdict.",
        ]
    return out


def body_cosines(runs, honest: bool, attacked_only: bool = False) -> list:
    """Every (site, round) body cosine (the body rule's statistic, from the RoundEngine's per-site log line) of the
    given runs: the honest sites' (honest=True), or the attackers' in the rounds they attack."""
    out = []
    for r in runs:
        for rd in r["rounds"]:
            for s, v in rd["sites"].items():
                if v.get("body_cosine") is None or (s in r["hostile"]) == honest:
                    continue
                if not honest and attacked_only and rd["round"] < SIZE["attack_from"]:
                    continue
                out.append(v["body_cosine"])
    return out


def body_lines(runs: dict) -> list:
    """The body rule's statistic measured: the honest sites' body cosines (honest runs with HE on and off, the
    honest sites of the HE-on attacked runs) against the thresholds, and the attackers' per HE-on row."""
    ok, bad = TrustPolicy.body_cosine_ok, TrustPolicy.body_cosine_bad
    out = []
    groups = [
        ("honest runs with HE on", [r for r in runs.values() if r["row"] is None and r["rules"] == "gm+he"]),
        ("honest runs with HE off", [r for r in runs.values() if r["row"] is None and r["rules"] == "gm"]),
        (
            "the honest sites of the HE-on attacked runs",
            [r for r in runs.values() if r["row"] and r["rules"] == "gm+he"],
        ),
    ]
    for what, mine in groups:
        mine = [r for r in mine if body_cosines([r], True)]  # the runs measured since the body cosine is logged
        cos = body_cosines(mine, True)
        if not cos:
            continue
        q = np.quantile(cos, [0.0, 0.05, 0.5])
        seeds = sorted({r["seed"] for r in mine})
        out.append(
            f"- {what} (seeds {', '.join(map(str, seeds))}; {len(mine)} run(s), {len(cos)} (site, round) cosines): "
            f"min {q[0]:+.3f}, 5th percentile {q[1]:+.3f}, median {q[2]:+.3f}; {sum(c < ok for c in cos)} below "
            f"body_cosine_ok ({ok}), {sum(c <= bad for c in cos)} at or below body_cosine_bad ({bad})."
        )
    for row in redteam.COLLUSION_ROWS:
        mine = [runs[key(row.name, s, "gm+he")] for s in SEEDS if key(row.name, s, "gm+he") in runs]
        cos = body_cosines(mine, False, attacked_only=True)
        if cos:
            out.append(f"- attackers, {row.name}, HE on: {min(cos):+.3f} to {max(cos):+.3f}")
    return out


def cap_section(runs: dict) -> list:
    """The vote cap (rules "gm+cap", TrustPolicy.vote_share_cap = VOTE_CAP): the rows played with it, their
    attackers' largest weight and paired gaps against the honest runs (with the cap where measured, else the
    default's: the cap leaves a round untouched when no weight is over it, and the honest weights are reported)."""
    capped = [r for r in runs.values() if r["rules"] == "gm+cap"]
    if not capped:
        return []
    honest = [r for r in runs.values() if r["row"] is None and r["rules"] == "gm"]
    top = max(
        (max(rd["weights"].values()) / (sum(rd["weights"].values()) or 1.0)) for r in honest for rd in r["rounds"]
    )
    out = [
        "",
        f"## The vote cap (TrustPolicy.vote_share_cap = {VOTE_CAP}, opt-in), measured",
        "",
        f"No site above {VOTE_CAP}x its count share of the weight (0.3 of five equal sites; a near-copy pair counted "
        "once 0.375 together), the excess handed to the others in proportion to their weights "
        "(fedmed.server.aggregation.cap_vote_weights). In the honest runs (HE off, seeds 0-2) no site's weight went "
        f"above {top:.3f}, so the cap never binds there and leaves those runs as they are (it returns the "
        "aggregator's result untouched when no weight is over its cap).",
        "",
    ]
    for s_ in SEEDS:
        h, hc = runs.get(key("honest", s_, "gm")), runs.get(key("honest", s_, "gm+cap"))
        if h and hc:
            out.append(f"- honest run, seed {s_}: {hc['auroc']:.3f} with the cap, {h['auroc']:.3f} without.")
    for row in redteam.COLLUSION_ROWS:
        mine = {s_: runs[key(row.name, s_, "gm+cap")] for s_ in SEEDS if key(row.name, s_, "gm+cap") in runs}
        if not mine:
            continue
        # against the capped honest run where measured, else the default's (the same run: see above)
        g = []
        for s_, r in mine.items():
            h = runs.get(key("honest", s_, "gm+cap")) or runs.get(key("honest", s_, "gm"))
            if h:
                g.append((s_, r["auroc"] - h["auroc"]))
        before = [g2 for _, g2 in gaps(runs, row.name, "gm", "gm")]
        out.append(
            f"- {row.name}, with the cap: attackers' weight together at most {max(max_share(r) for r in mine.values()):.2f}; "
            "paired gaps "
            + ", ".join(f"s{s_} {v:+.3f}" for s_, v in g)
            + (f" (mean {np.mean([v for _, v in g]):+.3f})" if len(g) > 1 else "")
            + (f"; without the cap: mean {np.mean(before):+.3f} over {len(before)} seed(s)" if before else "")
            + "."
        )
    return out


def rerun_noise(honest: dict, before: dict) -> list:
    """The same HE-on honest run measured twice (before the body rule and with it, which scores no honest site
    below 1 there: body_lines): how far two runs of one seed differ with HE on."""
    again = {
        s: (before[key("honest", s, "gm+he")]["auroc"], v)
        for s, v in honest.items()
        if key("honest", s, "gm+he") in before
    }
    if not again:
        return []
    return [
        "The same honest run with HE on, measured before the body rule and again with it (the body rule scored "
        "every honest site 1, so the rules were the same): "
        + ", ".join(f"seed {s} {a:.3f} then {b:.3f}" for s, (a, b) in again.items())
        + ". CKKS encryption is randomised (fresh key set, fresh noise each run), so HE-on runs of one seed agree "
        "in round 1 and drift apart from round 2: one HE-on run's AUROC carries that much noise, and the paired "
        "gaps with HE on are against HE-on honest runs measured with the body rule.",
        "",
    ]


def he_section(runs: dict, before: dict | None = None) -> list:
    """The rows played with the classifier layers encrypted (rules "gm+he"), seed 0, against the honest run with HE
    on (same seed); a row accepted there is judged by its paired gap over seeds 0-2. before: the HE-on runs measured
    before the body rule (BEFORE_BODY), quoted per row."""
    before = before or {}
    h = runs.get(key("honest", 0, "gm+he"))
    hs = {s: runs[key("honest", s, "gm+he")]["auroc"] for s in SEEDS if key("honest", s, "gm+he") in runs}
    out = [
        "",
        "## With HE on (the classifier layers encrypted): seed 0, and seeds 1-2 for a row accepted on seed 0",
        "",
        f"The classifier layers ({', '.join(redteam.HE_LAYERS)}) encrypted with a fresh CKKS key set, as hospitals "
        "run with HE on: the server combines them homomorphically with the weights it chose from the clear body and "
        "never sees them, so the direction rule (the classifier's cosine to the reference) has nothing to judge. "
        "What it judges is the clear body: the copy test (near-copies counted once), the distance to the "
        "coordinate-median reference, the sign rule, and the body rule (since these runs): the cosine of each "
        "site's whole clear move with the reference's (fedmed.server.aggregation.body_cosine) scores 0 at or below "
        f"TrustPolicy.body_cosine_bad ({TrustPolicy.body_cosine_bad}), 1 at or above body_cosine_ok "
        f"({TrustPolicy.body_cosine_ok}). The colluders craft the body from the honest sites' clear "
        "bodies and send their own honestly trained encrypted head (they cannot read the honest heads either); "
        "what a crafted encrypted head can do is the hospitals' check of the decrypted head (docs/redteam.md, "
        "'encrypted-head scaling'). Honest runs with HE on: "
        + (", ".join(f"seed {s} {v:.3f}" for s, v in hs.items()) or "not measured")
        + f". The HE-on runs before the body rule are kept in docs/redteam_collusion/{BEFORE_BODY}/.",
        "",
        *rerun_noise(hs, before),
        "| attack, HE on | what the server did (seed 0, attacked rounds) | AUROC seed 0 | held | before the body rule |",
        "|---|---|---|---|---|",
    ]
    n_rows, n_held, not_held = 0, 0, []
    for n in (2, 1):
        for row in (r for r in redteam.COLLUSION_ROWS if r.colluders == n):
            run = runs.get(key(row.name, 0, "gm+he"))
            if run is None:
                continue
            text, held = verdict(runs, row.name, "gm+he")
            n_rows, n_held = n_rows + 1, n_held + (held is True)
            if held is False:
                not_held.append(row.name)
            gap = f" ({run['auroc'] - h['auroc']:+.3f} vs honest with HE)" if h else ""
            old = before.get(key(row.name, 0, "gm+he"))
            old_text = f"AUROC seed 0 {old['auroc']:.3f}; {verdict(before, row.name, 'gm+he')[0]}" if old else "-"
            out.append(f"| {row.name} | {summary(run)} | {run['auroc']:.3f}{gap} | {text} | {old_text} |")
    out += [
        "",
        f"**HE on: {n_held} of {n_rows} rows played held**"
        + (f"; not held: {'; '.join(not_held)}" if not_held else "")
        + ". The rows not in this table were not played with HE on.",
        "",
        "### The body rule's statistic, measured",
        "",
        "The cosine of each site's clear move with the coordinate-median reference's, every round, from the "
        "RoundEngine's per-site log line (logged with HE off too, where it is not scored):",
        "",
        *body_lines(runs),
    ]
    return out if n_rows or h else []


def larger_section(folder: Path) -> list:
    """Each larger federation measured (folder/larger-*/, written by --per-site/--rounds/...): its size, the honest
    seed spread, the cost of one run and the rows played there."""
    out = []
    for sub in sorted(folder.glob("larger-*")):
        runs = load_runs(sub)
        if not runs:
            continue
        size = next(iter(runs.values()))["size"]
        honest = {s: runs[key("honest", s, "gm")] for s in SEEDS if key("honest", s, "gm") in runs}
        spread = max(r["auroc"] for r in honest.values()) - min(r["auroc"] for r in honest.values())
        out += [
            "",
            f"## A larger federation: {size['per_site']} images per hospital, {size['image_size']} px, "
            f"{size['rounds']} rounds, test set of {size['num_test']} (docs/redteam_collusion/{sub.name}/)",
            "",
            "Honest runs: "
            + ", ".join(f"seed {s} {r['auroc']:.3f} ({r['seconds']:.0f} s)" for s, r in honest.items())
            + (
                f". **Honest seed spread: {spread:.3f}** "
                f"({'below' if spread < 0.03 else 'not below'} the issue's 0.03"
                + (", from 3 seeds" if len(honest) == 3 else f", from only {len(honest)} seed(s)")
                + ")."
                if len(honest) > 1
                else "."
            ),
            "",
        ]
        mine = [
            v
            for r in runs.values()
            for rd in r["rounds"]
            for st, v in rd["sites"].items()
            if st not in r["hostile"] and v["sign_balance"] is not None
        ]
        if mine:
            out += [
                f"The honest sites there (every run, every round, {len(mine)} site-rounds): sign offsets at most "
                f"{max(abs(v['sign_balance']) for v in mine):.3f} from the median site's, classifier cosines at least "
                f"{min(v['head_cosine'] for v in mine if v['head_cosine'] is not None):+.2f}, distance ratios at most "
                f"{max(v['distance_ratio'] for v in mine):.2f} (TrustPolicy: sign_balance_ok {SIGN_OK}, head_cosine_ok "
                f"{TrustPolicy.head_cosine_ok}, ok_ratio {TrustPolicy.ok_ratio}); honest sites quarantined in any run "
                f"there: {sorted({s for r in runs.values() for s in honest_quarantined(r)}) or 'none'}.",
                "",
            ]
        for row in (r for r in redteam.COLLUSION_ROWS if r.colluders == 2):
            run = runs.get(key(row.name, 0, "gm"))
            if run is None:
                continue
            text, _ = verdict(runs, row.name)
            h = honest.get(0)
            gap = f" ({run['auroc'] - h['auroc']:+.3f} vs honest)" if h else ""
            out.append(f"- **{row.name}**: AUROC seed 0 {run['auroc']:.3f}{gap}; held: {text}. {summary(run)}")
    return out


def doc(runs: dict, command: str, before: dict | None = None, folder: Path | None = None) -> str:
    """The page, from the runs with the sign rule (runs) and those measured before it (before, BEFORE's JSON);
    folder: where the larger federations' runs are (its larger-* subfolders)."""
    before = before or {}
    honest = {s: runs[key("honest", s, "gm")]["auroc"] for s in SEEDS if key("honest", s, "gm") in runs}
    old_honest = {s: before[key("honest", s, "gm")]["auroc"] for s in SEEDS if key("honest", s, "gm") in before}
    spread = max(honest.values()) - min(honest.values()) if len(honest) > 1 else float("nan")
    mine = [r for r in runs.values() if r["rules"] == "gm"]  # fedavg's runs predate the rule, which it does not use
    seconds = sum(r["seconds"] for r in mine)
    lines = [
        "# Red team: two colluding hospitals of five (issue 28)",
        "",
        f"Command: `{command}` (one or two workers sharing one queue, each run written to docs/redteam_collusion/*.json "
        "as it finished; this page is regenerated from them by `python scripts/redteam_collusion.py --doc`). "
        f"{len(mine)} runs with the sign rule, {seconds:.0f} s of run time in all, under `nice -n 10` on a 2-core "
        "CPU shared with four other agents' jobs (one run takes ~90 s alone, 2 to 24 min here). The runs measured "
        f"before the sign rule ({len(before)}) are kept in docs/redteam_collusion/{BEFORE}/ and quoted below. "
        "Runs played again on later code, each overwriting its JSON, by `--remeasure RUN...`: the HE-off honest "
        "runs (with the body cosine logged) and the vote-cap runs (rules gm+cap).",
        "",
        f"Federation: the red team's default (fedmed-redteam): {SIZE['honest']} honest hospitals and one hostile of "
        f"{SIZE['per_site']} synthetic radiographs each, {SIZE['image_size']} px, {SIZE['rounds']} rounds of one "
        f"local epoch (batch {SIZE['batch_size']}) from a fresh DenseNet-121, geometric median with trust and "
        f"quarantine, judged by the coordinate median of the sites, **HE off**; global test set of "
        f"{SIZE['num_test']} images. The attackers are honest in round 1 and attack from round "
        f"{SIZE['attack_from']}, each knowing the round's honest updates (omniscient). Rows '2 colluding' turn "
        "honest-3 hostile too: 3 honest of 5. A larger federation (the issue's spread target) and HE on: sections "
        "below.",
        "",
        "The sign rule (fedmed.server.robust.sign_balance, since this page's runs): a site whose move's sign balance, "
        "(#coordinates up - #down) / #moved, lies 0.2 or more from the median site's scores 0 (rejected with the "
        "reason, then quarantined), 0.1 or less scores 1.",
        "",
        "Honest runs (every site honest), final AUROC by training seed, with the sign rule: "
        + (", ".join(f"seed {s} {v:.3f}" for s, v in honest.items()) or "not measured")
        + "; before it: "
        + ", ".join(f"seed {s} {v:.3f}" for s, v in old_honest.items())
        + f". **Honest seed spread at this size: {spread:.3f}** (the issue asks for below 0.03: this size does "
        "not meet it, which is why accepted rows are judged by the *paired* gap, attacking minus honest on the "
        "same seed, averaged over seeds 0, 1, 2, rather than against another seed's run; the larger federation at "
        "the end of this page is measured for that reason).",
        "",
        "Held: the attackers rejected, quarantined or refused with the reason in every round they attack (one seed "
        f"suffices: the reason is the criterion), or a mean paired gap of at least -{TOLERANCE} over seeds 0, 1, 2; "
        "never held when an honest hospital is quarantined.",
        "",
        "A rejected row still loses what the attackers' data would have added: with the pair out from round 2 the "
        "three honest hospitals train alone (seed 0: 0.727 against 0.752 with all five honest, the same for every "
        "rejected two-colluder row); no rule can give that back.",
        "",
        "| attack | what the server did (seed 0, attacked rounds) | AUROC seed 0 | held | before the sign rule |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for n in (2, 1):
        for row in (r for r in redteam.COLLUSION_ROWS if r.colluders == n):
            run = runs.get(key(row.name, 0, "gm"))
            text, held = verdict(runs, row.name)
            old_text, _ = verdict(before, row.name)
            if row.attack.kind in ADAPTIVE:
                old_text = "- (an attack on the sign rule: not played before it)"
            verdicts.append((row.name, held))
            did = summary(run) if run else "-"
            auc = f"{run['auroc']:.3f}" if run else "-"
            if run and 0 in honest:  # a rejected pair's data is lost too: the gap shows what that costs
                auc += f" ({run['auroc'] - honest[0]:+.3f} vs honest)"
            old = before.get(key(row.name, 0, "gm"))
            old_auc = f"AUROC seed 0 {old['auroc']:.3f}; " if old else ""
            lines.append(f"| {row.name} | {did} | {auc} | {text} | {old_auc}{old_text} |")
    n_held = sum(h is True for _, h in verdicts)
    n_not = [n for n, h in verdicts if h is False]
    n_open = [n for n, h in verdicts if h is None]
    lines += [
        "",
        f"**Summary: {n_held} of {len(verdicts)} rows held; {len(n_not)} not held"
        + (f" ({'; '.join(n_not)})" if n_not else "")
        + f"; {len(n_open)} not measured"
        + (f" ({'; '.join(n_open)})" if n_open else "")
        + ".**",
        "",
        "## The sign rule's statistic, measured",
        "",
        *sign_table(runs),
        "",
        "## The adaptive attacker (it knows the sign rule)",
        "",
        "fedmed.sim.attacks.sign_balanced_move: the ALIE (paper's z) and Min-Max inverse-std shifts, with each "
        "coordinate pushed against the honest mean (mean - gamma * sign(mean) * std) and then the shift's sign "
        "flipped on the fewest, least harmful coordinates that make the move's sign balance equal the median honest "
        "site's. Its offsets above show what the sign rule sees of it; its rows in the table show what it costs.",
        "",
        *adaptive_lines(runs),
        *he_section(runs, load_runs(folder / BEFORE_BODY) if folder is not None else {}),
        *cap_section(runs),
        *(larger_section(folder) if folder is not None else []),
    ]
    fed = [r for k, r in runs.items() if r["rules"] == "fedavg"]
    if fed:
        lines += ["", "## Plain FedAvg (no trust rule) under a two-colluder attack, for contrast", ""]
        h = runs.get(key("honest", 0, "fedavg"))
        for r in fed:
            if r["row"] is None:
                continue
            ref = f"{h['auroc']:.3f}" if h else "not run"
            gap = f", gap {r['auroc'] - h['auroc']:+.3f}" if h else ""
            g = runs.get(key(r["row"], 0, "gm"))
            gm = f"; the defended engine under the same attack: {g['auroc']:.3f}" if g else ""
            lines.append(f"- {r['row']}, seed 0: AUROC {r['auroc']:.3f} (FedAvg honest {ref}{gap}){gm}.")
    cc_h = {s: before[key("honest", s, "gm+cc")]["auroc"] for s in SEEDS if key("honest", s, "gm+cc") in before}
    lines += ["", "## Centred clipping (JobConfig.centred_clipping), measured before the sign rule", ""]
    if cc_h:
        cost = [(s, cc_h[s] - old_honest[s]) for s in SEEDS if s in cc_h and s in old_honest]
        lines.append(
            "Cost on the honest run (centred clipping minus the default, same seed): "
            + ", ".join(f"seed {s} {v:+.3f}" for s, v in cost)
            + (f"; mean {np.mean([v for _, v in cost]):+.3f}." if cost else ".")
            + " It stays opt-in: the sign rule holds the rows it was for without that cost."
        )
        for row in (r for r in redteam.COLLUSION_ROWS if r.colluders == 2):
            if key(row.name, 0, "gm+cc") not in before:
                continue
            text, _ = verdict(before, row.name, "gm+cc")
            lines.append(f"- {row.name}: with centred clipping (no sign rule) {text}.")
    for row in (r for r in redteam.COLLUSION_ROWS if r.attack.kind in ADAPTIVE):
        cc = {s: runs[key(row.name, s, "gm+cc")]["auroc"] for s in SEEDS if key(row.name, s, "gm+cc") in runs}
        if not cc:
            continue
        vs = [(s, v - honest[s]) for s, v in cc.items() if s in honest]
        vs_cc = [(s, v - cc_h[s]) for s, v in cc.items() if s in cc_h]
        lines.append(
            f"- **{row.name}, with centred clipping and the sign rule (measured now)**: AUROC "
            + ", ".join(f"s{s} {v:.3f}" for s, v in cc.items())
            + "; paired gap to the default honest run "
            + ", ".join(f"s{s} {v:+.3f}" for s, v in vs)
            + (f" (mean {np.mean([v for _, v in vs]):+.3f})" if vs else "")
            + "; to the honest run with centred clipping (measured before the sign rule, which scores no honest site "
            "below 1, so unchanged by it) "
            + ", ".join(f"s{s} {v:+.3f}" for s, v in vs_cc)
            + (f" (mean {np.mean([v for _, v in vs_cc]):+.3f})" if vs_cc else "")
            + "."
        )
    honest_runs = [r for r in runs.values() if r["row"] is None and r["rules"] == "gm"]
    attacked = [
        {
            **r,
            "rounds": [
                {**rd, "sites": {s: v for s, v in rd["sites"].items() if s not in r["hostile"]}} for rd in r["rounds"]
            ],
        }
        for r in runs.values()
        if r["row"] is not None and r["rules"] == "gm"
    ]
    lines += [
        "",
        "## The direction rule's thresholds against the coordinate-median reference",
        "",
        "The cosine between each site's move of the classifier layers and the judging reference's (the coordinate "
        "median of the sites, since issue 28), every round, from the RoundEngine's per-site log line (recorded in "
        "the JSON), runs with the sign rule. Honest runs: " + " ".join(cosine_table(honest_runs)),
        "",
        "The honest sites of the attacked runs (the reference then includes the colluders' votes): "
        + " ".join(cosine_table(attacked)),
        "",
        *attacker_cosines(runs),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/redteam"))
    p.add_argument("--runs", type=Path, default=Path("docs/redteam_collusion"))
    p.add_argument("--budget-s", type=float, default=3600.0, help="start no run after this many seconds")
    p.add_argument("--doc", action="store_true", help="only regenerate the doc from the JSON")
    p.add_argument("--out", type=Path, default=Path("docs/redteam_collusion.md"))
    p.add_argument(
        "--per-site",
        type=int,
        default=SIZE["per_site"],
        help="images per hospital (a larger size: "
        "give its own --data and --runs, e.g. docs/redteam_collusion/larger-...)",
    )
    p.add_argument(
        "--remeasure",
        nargs="+",
        default=[],
        metavar="RUN",
        help="play these runs again (named as their JSON, e.g. gm-honest-s0), overwriting what they measured",
    )
    p.add_argument("--rounds", type=int, default=SIZE["rounds"])
    p.add_argument("--image-size", type=int, default=SIZE["image_size"])
    p.add_argument("--num-test", type=int, default=SIZE["num_test"])
    a = p.parse_args(argv)
    for name in ("per_site", "rounds", "image_size", "num_test"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.rounds < SIZE["attack_from"]:
        p.error(f"--rounds must be at least {SIZE['attack_from']} (the attackers attack from that round)")
    if a.remeasure:
        try:
            remeasure_jobs(a.remeasure)
        except ValueError as e:
            p.error(str(e))
    if not a.doc:
        measure(a)
    if (a.per_site, a.rounds, a.image_size, a.num_test) != tuple(
        SIZE[k] for k in ("per_site", "rounds", "image_size", "num_test")
    ):
        print(f"a larger federation: the page's section comes from {a.runs} when --doc runs on its parent")
        return 0
    command = "nice -n 10 python scripts/redteam_collusion.py --budget-s 3500"
    a.out.write_text(doc(load_runs(a.runs), command, load_runs(a.runs / BEFORE), a.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
