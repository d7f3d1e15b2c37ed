"""The red-team suite: each attack one hospital (or, for the published colluding attacks, two) can make, played through the one round engine in-process, with
what the server did, what the database holds, and the final AUROC against honest references.

The reference an attack is judged against is the same federation with the hostile site honest throughout (what
its behaviour is compared with; same seeds, so the two runs differ only by what it sent). Two more references
show how much honest outcomes vary at this size: the site leaving when it turns hostile, and the honest sites
alone from the start. An attack is held when the final global model is no more than `tolerance` AUROC below the
stayed-honest reference, or when
the attacker's update is rejected (or quarantined, or refused by the hospitals) in every round it attacked, with
the reason recorded. For the inflated count, what a claim can buy must not exceed an honest site's: its count
after the cap at most every honest site's, and its final aggregation weight (which also reflects where its update
lies) within WEIGHT_SLACK of the largest honest site's. Used by scripts/redteam.py (docs/redteam.md) and tests/test_redteam.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from fedmed.job.tasks import CHEST_XRAY14
from fedmed.sim.attacks import Attack
from fedmed.sim.inprocess import Adversary, FederationPlan, federate
from fedmed.store.repository import Repository, RoundRecord

HOSTILE = "hostile"  # the attacker's site name in every row
SERVER_VALIDATION = "server-validation"  # labelled images the server scores each update on (validation screening)


@dataclass(frozen=True)
class AttackRow:
    name: str
    attack: Attack
    he: bool = False  # the attack needs the head encrypted
    colluders: int = 1  # hostile sites: HOSTILE, then the last honest sites turned hostile (colluder_sites)


def colluder_sites(row: AttackRow, sites: Sequence[str]) -> list:
    """The row's hostile sites: HOSTILE and, for a colluding row, the last colluders - 1 other sites (honest data,
    hostile updates), so 2 colluders of 5 leave 3 honest hospitals."""
    others = [s for s in sites if s != HOSTILE]
    if not 1 <= row.colluders <= len(others):
        raise ValueError(f"{row.name}: {row.colluders} colluders need {row.colluders - 1} sites beside {HOSTILE}")
    return [HOSTILE] + others[len(others) - (row.colluders - 1) :]


ROWS = (
    AttackRow("sign flip (x5)", Attack("sign_flip", 5.0)),
    AttackRow("scale (x20)", Attack("scale", 20.0)),
    AttackRow("gaussian noise (x5 RMS)", Attack("gaussian_noise", 5.0)),
    AttackRow("label flip", Attack("label_flip")),
    AttackRow("NaN", Attack("nan")),
    AttackRow("a little is enough (z=1)", Attack("little_is_enough", 1.0)),
    AttackRow("inflated sample count (x100)", Attack("inflate_count", 100.0)),
    AttackRow("BatchNorm poisoning (running_var -1e6)", Attack("bn_poison", 1e6)),
    AttackRow("encrypted-head scaling (x100, HE on)", Attack("he_scale", 100.0), he=True),
    AttackRow("encrypted block at another scale (HE on)", Attack("he_other_scale"), he=True),
    AttackRow("10 kB metric name", Attack("long_metric", 10_000)),
    AttackRow("replay of its previous-round update", Attack("replay")),
    AttackRow("two sites sending the same update", Attack("copy_site")),
)
# The published attacks of the robust-aggregation literature, omniscient (each colluder knows the round's honest
# updates), with 1 and with 2 colluding hospitals of 5 (fedmed.sim.attacks.craft_colluding; issue 28).
COLLUDING = (
    ("omniscient ALIE, paper's z", Attack("alie", 0.0)),
    ("omniscient ALIE, z=1", Attack("alie", 1.0)),
    ("Min-Max, unit direction", Attack("min_max_unit")),
    ("Min-Max, inverse-std direction", Attack("min_max_std")),
    ("Min-Sum, unit direction", Attack("min_sum_unit")),
    ("Min-Sum, inverse-std direction", Attack("min_sum_std")),
    ("IPM, eps 0.5", Attack("ipm", 0.5)),
    ("IPM, eps 100", Attack("ipm", 100.0)),
    # Adaptive: they know the sign rule and balance their shift's signs (fedmed.sim.attacks.sign_balanced_move).
    ("adaptive ALIE, paper's z, sign-balanced", Attack("alie_balanced", 0.0)),
    ("adaptive Min-Max, inverse-std, sign-balanced", Attack("min_max_balanced")),
)
COLLUSION_ROWS = tuple(
    AttackRow(f"{name} ({'1 hostile site' if n == 1 else f'{n} colluding sites'})", attack, colluders=n)
    for n in (1, 2)
    for name, attack in COLLUDING
)
ROWS = ROWS + COLLUSION_ROWS
HE_LAYERS = ("class_layers.out.",)
BLOCKED = ("rejected", "quarantined", "refused")
WEIGHT_SLACK = 0.05


@dataclass(frozen=True)
class RowResult:
    name: str
    server_did: str  # per round: the attacker's status and the recorded reason
    database: str  # what the database holds for the attacker (statuses, alerts)
    auroc: float
    honest_auroc: float
    held: bool
    how: str  # "rejected", "bounded", "refused by the hospitals", or why it was not held
    max_weight_ratio: Optional[float] = None  # attackers' weight together / largest honest weight, worst round
    max_count_ratio: Optional[float] = None  # attacker's capped count / smallest honest capped count, worst round
    references: Optional["References"] = None  # every honest reference (honest_auroc is references.stayed_honest)
    seed_gaps: tuple = ()  # accepted attacks: (seed, AUROC minus the stayed-honest run's) per seed judged
    honest_quarantined: tuple = ()  # honest sites the engine quarantined during the row (a row holding none)
    max_weight_share: Optional[float] = None  # attackers' share of the aggregate's weight, worst round (captured: 1)


@dataclass(frozen=True)
class References:
    """Final AUROC of honest versions of the red-team federation (same seeds)."""

    stayed_honest: float  # the hostile site honest in every round: the counterfactual an attack is judged against
    left: float  # the hostile site honest until it would attack, then gone (recorded missing)
    alone: float  # the honest sites alone, from the start
    he: bool = False  # measured with the head encrypted (the HE rows' reference)

    @property
    def spread(self) -> float:
        """How far apart honest outcomes land at this size: the noise floor of an AUROC comparison."""
        return max(self.stayed_honest, self.left, self.alone) - min(self.stayed_honest, self.left, self.alone)


def is_bounded(auroc: float, stayed_honest: float, tolerance: float) -> bool:
    """An accepted attack is bounded when the final model is at most `tolerance` below the run where the site
    stayed honest. One-sided: ending higher than the honest run is no harm."""
    return auroc >= stayed_honest - tolerance


@dataclass(frozen=True)
class Bench:
    """The red team's federation: the sites' training sets (HOSTILE among them), the global test set, the rounds,
    the round index from which the hostile sites attack (honest before it), and the federate() settings every row
    shares. centred_clipping: RoundRules.centred_clipping (issue 28's time-coupled defence)."""

    train_sets: Mapping
    test_set: Any
    rounds: int
    attack_from: int = 0
    batch_size: int = 16
    server_validation: Any = None  # labelled images the server scores each update on (None: no such screening)
    centred_clipping: bool = False

    def plan(self, seed: int, he: bool = False) -> FederationPlan:
        """Geometric median with trust and quarantine, as deployed; HE_LAYERS encrypted when he."""
        return FederationPlan(
            task=CHEST_XRAY14,
            rounds=self.rounds,
            aggregation="geometric_median",
            centred_clipping=self.centred_clipping,
            batch_size=self.batch_size,
            seed=seed,
            he_layers=HE_LAYERS if he else None,
        )

    def adversary(self, row: AttackRow) -> Adversary:
        return Adversary({s: row.attack for s in colluder_sites(row, list(self.train_sets))}, self.attack_from)

    def federate(self, seed: int, he: bool = False, adversary=None, train_sets=None, absent=None, on_round=None):
        """fedmed.sim.inprocess.federate on this bench with this training seed; train_sets: a subset of the sites (the
        honest sites alone), absent / on_round: as federate's."""
        return federate(
            self.train_sets if train_sets is None else train_sets,
            self.test_set,
            self.plan(seed, he),
            adversary,
            absent=absent,
            server_validation=self.server_validation,
            on_round=on_round,
        )


def run_row(
    row: AttackRow,
    bench: Bench,
    honest_auroc,
    db_dir: Path,
    tolerance: float = 0.02,
    extra_seeds: Sequence[int] = (),
) -> RowResult:
    """Play one attack (the hostile sites attack from round index bench.attack_from; honest before) and judge it.
    honest_auroc: a References, or the stayed-honest AUROC alone (both from training seed 0). extra_seeds: for an
    attack that is accepted, also play it and its stayed-honest run with these training seeds and judge the mean
    AUROC gap."""
    references = honest_auroc if isinstance(honest_auroc, References) else None
    honest_auroc = references.stayed_honest if references is not None else float(honest_auroc)
    train_sets, rounds, attack_from = bench.train_sets, bench.rounds, bench.attack_from
    hostile = colluder_sites(row, list(train_sets))
    repo = Repository(f"sqlite:///{Path(db_dir) / (row.attack.kind + f'-{row.colluders}.db')}")
    uid = f"redteam-{row.attack.kind}"
    repo.start_run(uid, row.name, uid, "geometric_median", rounds, {"attack": row.attack.kind})

    def record(report):
        repo.record_round(uid, RoundRecord(report.round_num + 1, report.updates, alerts=report.alerts))  # from 1

    fed = bench.federate(0, row.he, bench.adversary(row), on_round=record)
    run_id = repo.latest_run_id()
    rows = [u for u in repo.client_updates(run_id) if u["site"] in hostile]
    alerts = [a for a in repo.alerts(run_id) if a["site"] in hostile]
    refusals = [u for u in repo.client_updates(run_id) if u["status"] == "refused" and u["site"] not in hostile]
    honest_quarantined = tuple(
        sorted({u["site"] for u in repo.client_updates(run_id) if u["status"] == "quarantined"} - set(hostile))
    )
    repo.close()

    per_round, blocked, ratios, count_ratios, shares = [], [], [], [], []
    for report in fed.reports:
        if report.round_num < attack_from:
            continue  # honest rounds: nothing to judge
        mine = [next(x for x in report.updates if x.site == s) for s in hostile]
        honest_w = [w for s, w in report.weights.items() if s not in hostile]
        if honest_w and max(honest_w) > 0:
            ratios.append(sum(report.weights.get(s, 0.0) for s in hostile) / max(honest_w))
        if sum(report.weights.values()) > 0:
            shares.append(sum(report.weights.get(s, 0.0) for s in hostile) / sum(report.weights.values()))
        honest_n = [n for s, n in report.used_samples.items() if s not in hostile]
        if HOSTILE in report.used_samples and honest_n:
            count_ratios.append(report.used_samples[HOSTILE] / min(honest_n))
        said = []
        for u in mine:
            reason = f" ({u.reason[:90].replace(';', ',')})" if u.reason else ""
            said.append(f"{u.status}{reason}" if len(hostile) == 1 else f"{u.site} {u.status}{reason}")
        if not report.aggregated and report.problem:
            said.append(f"round held: {report.problem[:90].replace(';', ',')}")
        per_round.append(f"r{report.round_num + 1} {' / '.join(said)}")
        blocked.append(all(u.status in BLOCKED for u in mine))
    if fed.stopped:
        per_round.append(f"run stopped: {fed.stopped[:90]}")
    database = (
        ", ".join(f"r{u['round']} {u['status']}" for u in rows if u["round"] > attack_from)  # from 1
        + f"; {len(alerts)} alert(s)"
        + (f"; {len(refusals)} hospital refusal(s)" if refusals else "")
    )
    auroc = float(fed.auroc)
    hospitals_refused = bool(refusals) and all(
        u.status == "refused" for r in fed.reports[-1:] for u in r.updates if u.site != HOSTILE
    )
    # Rounds where the attack had nothing to act on (a replay in round 1) are honest rounds.
    judged = [r for r in fed.reports if r.round_num >= attack_from]
    attacked = [b for b, r in zip(blocked, judged) if not (row.attack.kind == "replay" and r.round_num == 0)]
    seed_gaps: tuple = ()
    if attacked and all(attacked) and all(u["reason"] for u in rows if u["status"] in BLOCKED):
        held, how = True, "rejected" if not any(u["status"] == "quarantined" for u in rows) else "rejected/quarantined"
    elif hospitals_refused:
        held, how = True, "refused by the hospitals (their check of the decrypted head)"
    else:
        # Accepted: judged by its AUROC against the stayed-honest run. One run's gap carries the spread of honest
        # outcomes at this size (References.spread), so with extra_seeds the gap is averaged over seeds.
        seed_gaps = ((0, auroc - honest_auroc),) + tuple((s, _auroc_gap(row, bench, s)) for s in extra_seeds)
        mean_gap = float(np.mean([g for _, g in seed_gaps]))
        over = (
            f" over seeds {', '.join(str(s) for s, _ in seed_gaps)}: mean gap {mean_gap:+.3f} "
            f"({', '.join(f'{g:+.3f}' for _, g in seed_gaps)})"
            if extra_seeds
            else ""
        )
        if is_bounded(honest_auroc + mean_gap, honest_auroc, tolerance):
            held, how = True, "bounded" + over
        else:
            held, how = False, f"NOT held: AUROC {auroc:.3f} vs {honest_auroc:.3f} had it stayed honest" + over
    if honest_quarantined:  # the defence turned on the honest majority: never held, whatever the AUROC
        held, how = False, f"NOT held: honest site(s) {', '.join(honest_quarantined)} quarantined; " + how
    worst = max(ratios) if ratios else None
    worst_count = max(count_ratios) if count_ratios else None
    if row.attack.kind == "inflate_count":
        if worst_count is None or worst_count > 1.0 + 1e-9 or worst is None or worst > 1.0 + WEIGHT_SLACK:
            held, how = (
                False,
                (f"NOT held: the attacker's count counted {worst_count}x and its weight {worst}x an honest site's"),
            )
        else:
            how += f"; its count counted {worst_count:.2f}x, its weight {worst:.3f}x the largest honest site's"
    return RowResult(
        row.name,
        "; ".join(per_round),
        database,
        auroc,
        honest_auroc,
        held,
        how,
        worst,
        worst_count,
        references,
        seed_gaps,
        honest_quarantined,
        max(shares) if shares else None,
    )


def _auroc_gap(row: AttackRow, bench: Bench, seed: int) -> float:
    """Final AUROC of the attacked federation minus that of the stayed-honest one, both with this training seed."""
    attacked = bench.federate(seed, row.he, bench.adversary(row))
    honest = bench.federate(seed, row.he)
    return float(attacked.auroc) - float(honest.auroc)


def honest_references(bench: Bench, he: bool = False) -> References:
    """The three honest versions of the red-team federation (References), with HE on or off as the rows need."""
    honest = {s: d for s, d in bench.train_sets.items() if s != HOSTILE}
    return References(
        stayed_honest=float(bench.federate(0, he).auroc),
        left=float(bench.federate(0, he, absent={HOSTILE: bench.attack_from}).auroc),
        alone=float(bench.federate(0, he, train_sets=honest).auroc),
        he=he,
    )


def markdown(results: list, command: str, seconds: float, setup: str) -> str:
    lines = [
        "# Red team: one hostile hospital, or two colluding, against the round engine",
        "",
        f"Command: `{command}` ({seconds:.0f} s on a 2-core CPU). {setup}",
        "",
        "| attack | what the server did (hostile site, per round) | database holds | final AUROC | had it stayed "
        "honest | held |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.server_did.replace('|', '/')} | {r.database} | {r.auroc:.3f} | "
            f"{r.honest_auroc:.3f} | {'yes' if r.held else '**NO**'}: {r.how} |"
        )
    held = sum(r.held for r in results)
    lines += ["", f"{held}/{len(results)} attacks held."]
    for ref in dict.fromkeys(r.references for r in results if r.references is not None):
        lines += [
            "",
            f"Honest references{' (HE on)' if ref.he else ''}: the hostile "
            f"site honest throughout {ref.stayed_honest:.3f}; leaving when it would attack {ref.left:.3f}; "
            f"the honest sites alone {ref.alone:.3f}. Honest outcomes at this size spread over "
            f"{ref.spread:.3f} AUROC: the noise floor of any comparison here.",
        ]
    return "\n".join(lines) + "\n"


def make_sites(root: Path, n_honest: int, per_site: int, seed: int, num_test: int, size: int = 96) -> list:
    """n_honest synthetic hospitals honest-0.. plus HOSTILE (its data is honest; what it sends is not), the
    server's validation images (SERVER_VALIDATION) and a global test set, generated once into root. Returns the
    training sites' names."""
    from fedmed.data.synthetic import DEFAULT_HOSPITALS, HospitalSpec, generate_hospitals

    names = [f"honest-{i}" for i in range(n_honest)] + [HOSTILE]
    if not (root / "global_test" / "labels.csv").exists():
        specs = [
            HospitalSpec(n, per_site, DEFAULT_HOSPITALS[i % 3].scanner)
            for i, n in enumerate(names + [SERVER_VALIDATION])
        ]
        generate_hospitals(root, specs, num_test=num_test, seed=seed, size=size)
    return names


def load_sites(root: Path, names: list, image_size: int, seed: int = 0):
    from fedmed.data.loading import load_test, load_train_val
    from fedmed.site.site_config import DataConfig

    train = {
        s: load_train_val(
            DataConfig("dicom", root / s / "dicom", root / s / "labels.csv"), image_size, seed, CHEST_XRAY14
        )[0]
        for s in names
    }
    test = load_test(root / "global_test" / "dicom", root / "global_test" / "labels.csv", image_size, CHEST_XRAY14)
    val = load_test(
        root / SERVER_VALIDATION / "dicom", root / SERVER_VALIDATION / "labels.csv", image_size, CHEST_XRAY14
    )
    return train, test, val
