"""The round engine: everything the server decides about one round, as plain functions of what the sites sent.

Pure core (no NVFlare import). The NVFlare Controller (fedmed.flare.controller) converts each site's FLModel into a
SiteResult (fedmed.flare.wire) and calls RoundEngine.step; the in-process federation used by the benchmarks and the
red-team script (fedmed.sim.inprocess) calls the very same step. One round, in order:

1. screen each result: refusal, claimed sample count, parameter names/shapes/finiteness, BatchNorm statistics,
   metrics, encrypted block (scale, level, sizes, key set), replay of an earlier update of the job, and the same
   update sent by two sites; a failing update is rejected with the reason and scores 0;
2. count near-copies once (fedmed.server.robust.collusion), aggregate the active (valid, not quarantined) sites with
   counts capped (fedmed.server.aggregation), score every valid site by its distance and classifier direction against the
   coordinate median of the sites (a reference a minority cannot capture), leave far outliers out of this very
   round and aggregate again; a round whose rules would turn on half of the sites or more is not committed;
3. combine the encrypted layers homomorphically with the same weights, each site's block under its own guard
   (one block that fails rejects that site and the round is aggregated again without it);
4. fold the scores into trust (quarantine / re-admission) and return a RoundReport with the new global model, one
   UpdateRecord per site, the alerts and what to log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, NamedTuple, Optional, Sequence

import numpy as np

from fedmed.job.records import AlertRecord, UpdateRecord
from fedmed.learning.algorithms import FedOpt, ScaffoldServer, ServerOptimizer, find_control_problem, is_weight
from fedmed.models.hashing import update_blake3
from fedmed.server import kernels
from fedmed.server.aggregation import (
    LINEAR_AGGREGATORS,
    DirectionCheck,
    aggregate_and_score,
    find_update_problem,
    get_aggregator,
)
from fedmed.server.parallel import thread_map
from fedmed.server.passes import hash_and_norm, update_pass
from fedmed.server.robust.centred_clipping import centred_clip, committed_move
from fedmed.server.robust.collusion import NEAR_COPY_RATIO, CollusionTracker
from fedmed.server.robust.geometric_median import distance_keys
from fedmed.server.robust.sign_balance import balance_of
from fedmed.server.robust.trust import SiteTrust, TrustPolicy, update_trust
from fedmed.server.screening import (
    DEFAULT_STATISTICS_FACTOR,
    find_count_problem,
    find_metrics_problem,
    find_statistics_problem,
)


@dataclass(frozen=True)
class SiteResult:
    """What one site returned for a round, as the server received it (nothing here is trusted)."""

    site: str
    params: Optional[Mapping[str, np.ndarray]] = None  # clear parameters (the encrypted ones are in `encrypted`)
    claimed_samples: object = None  # the site's own claim; checked, then capped before it weighs anything
    metrics: Mapping = field(default_factory=dict)  # train/validation metrics the site chose to release
    privacy: Mapping = field(default_factory=dict)  # epsilon, delta, epsilon_budget, noise_multiplier
    encrypted: object = None  # wire-format CKKS block (fedmed.security.ckks.EncryptedLayers.to_wire()) or None
    refused: Optional[str] = None  # the site declined the round itself (privacy budget, a global model it rejects)
    unavailable: Optional[str] = None  # the site cannot take part in this job at all (its set-up failed): why
    signature: Optional[str] = None  # hex signature of the update (fedmed.security.signing), kept with the record
    signed_digest: Optional[str] = None  # hex digest the server computed and verified the signature over
    # BLAKE3 of `params` (fedmed.models.hashing.params_blake3) as the adapter took it to verify the signature, from
    # these very arrays: screening records it instead of hashing the update again. Set by the server, never the site.
    params_blake3: Optional[str] = None
    authentication: Optional[str] = None  # why the signature failed (set by the adapter that verified it)
    data_synthetic: Optional[bool] = None  # the site says it trained on synthetic data (for the model card only)
    control_delta: object = (
        None  # SCAFFOLD: the site's control-variate change (fedmed.learning.algorithms), screened too
    )
    ledger_head: object = None  # the site's privacy ledger head as it reported it (checked by fedmed.server.anchors)
    receipt: object = None  # the audit receipt the site last saw, as it reported it (checked by fedmed.server.anchors)


@dataclass(frozen=True)
class EncryptionSpec:
    """The server's view of the encrypted layers: its secret-free context and the layers' names and shapes."""

    context: object  # fedmed.security.ckks.LoadedContext
    names: tuple
    shapes: Mapping[str, tuple]


@dataclass(frozen=True)
class RoundRules:
    """Every rule of a round. Args:
    aggregation: a name in fedmed.server.aggregation.AGGREGATORS.
    min_clients: valid, trusted updates a round needs to aggregate.
    trust: the trust / quarantine rule.
    statistics_factor: how far BatchNorm statistics may move per round (fedmed.server.screening).
    validation_margin: with a server validation set (RoundEngine's `validate`), an update whose own score there is
        more than this below the median site's is rejected. Relative to the other sites, like the distance rule,
        so early rounds where every update is near chance reject nobody. Measured on the red team's hospitals
        (100 images each, 64 px): after two honest rounds the honest sites were within 0.011 of the median and a
        label-flipping site 0.068 below; after one honest round the honest sites spread over 0.10 (one 0.046
        below the median) and the label flipper sat in the middle. So the default only rejects gross drops; a
        federation with larger, steadier sites can lower it.
    head_layers: name prefixes of the classifier layers whose direction of change is scored against the
        coordinate median of the sites' (TrustPolicy.head_cosine_ok / head_cosine_bad; the median rather than the
        aggregate since issue 28); () turns the direction rule off. Layers the
        server cannot read (encrypted with HE) are not checked: HE hides what would show a label flipper.
    near_copy_ratio: sites whose moves (this round, or summed over the job's rounds) are closer than this fraction
        of the median nearest-neighbour distance are counted once together (fedmed.server.robust.collusion).
    centred_clipping: combine the sites the rules kept by centred clipping around the server's momentum
        (fedmed.server.robust.centred_clipping; Karimireddy, He and Jaggi 2021) instead of the aggregator's weights, so a
        site's weight stays near its count share however central it sits (the small, consistent attacks: "a
        little is enough", Min-Max / Min-Sum inverse-std). Off by default until measured at size (docs/
        THREAT_MODEL.md); not with HE (the momentum of the encrypted layers is not kept).
    server_optimizer: FedOpt on the committed aggregate (fedmed.learning.algorithms.ServerOptimizer: FedAdam / FedYogi; kind
        "none", the default, commits the aggregate itself). Steps the clear weights only: BatchNorm statistics are
        taken as aggregated, CKKS-encrypted layers as their weighted sum.
    scaffold: keep SCAFFOLD's server control variate c (fedmed.learning.algorithms): each update must carry a control-variate
        delta, screened with it, and the kept deltas move c with the aggregator's weights.
    Whatever the rules: a round in which the distance and direction rules would reject or quarantine half of the
    valid sites or more is not committed (see RoundEngine.step).
    """

    aggregation: str = "geometric_median"
    # No default: how many sites a round needs is the job's (fedmed.job.jobconfig.JobConfig.required_clients, whose
    # default is default_min_clients); keyword-only so the fields after it keep theirs.
    min_clients: int = field(kw_only=True)
    trust: TrustPolicy = field(default_factory=TrustPolicy)
    statistics_factor: float = DEFAULT_STATISTICS_FACTOR
    validation_margin: float = 0.1
    head_layers: tuple = ("class_layers.out.",)
    near_copy_ratio: float = NEAR_COPY_RATIO
    centred_clipping: bool = False
    server_optimizer: ServerOptimizer = field(default_factory=ServerOptimizer)
    scaffold: bool = False

    def __post_init__(self):
        get_aggregator(self.aggregation)  # raises naming the valid choices
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if not self.statistics_factor > 1:
            raise ValueError(f"statistics_factor must be > 1, got {self.statistics_factor}")
        if not 0 < self.validation_margin < 1:
            raise ValueError(f"validation_margin must be in (0, 1), got {self.validation_margin}")
        if not 0 < self.near_copy_ratio < 1:
            raise ValueError(f"near_copy_ratio must be in (0, 1), got {self.near_copy_ratio}")


def default_min_clients(num_sites: int) -> int:
    """A job's min_clients when it does not say: one site may fail, refuse or be quarantined without stopping the
    job (all sites but one with 3 or more sites, else all). The one place this default lives."""
    return num_sites - 1 if num_sites >= 3 else num_sites


def check_encryption_compatible(aggregation: str) -> None:
    """Encrypted layers are combined as a weighted sum of the sites' ciphertexts; refuse, when the job is built, an
    aggregator that is not one."""
    if aggregation not in LINEAR_AGGREGATORS:
        raise ValueError(
            f"aggregation {aggregation!r} cannot be used with HE: the encrypted layers can only be "
            f"combined as a weighted sum of the sites' ciphertexts, and {aggregation} is not one; "
            f"choose one of {list(LINEAR_AGGREGATORS)}"
        )


@dataclass(frozen=True)
class RoundReport:
    round_num: int
    aggregated: bool  # False: too few valid, trusted updates; the global model is unchanged
    params: Optional[dict]  # the new global clear parameters (None when not aggregated)
    encrypted: object  # the combined EncryptedLayers (None without HE or when not aggregated)
    updates: tuple  # one UpdateRecord per site (targets and any site that answered)
    alerts: tuple  # AlertRecord
    weights: dict  # site -> weight in the aggregate (0 for sites left out)
    used_samples: dict  # aggregated site -> sample count after the cap
    diagnostics: dict  # the aggregator's (Weiszfeld iterations, fallback, ...)
    problem: Optional[str] = None  # why the round was not aggregated
    log: tuple = ()  # (level, message) pairs for the adapter's logger: "info" | "warning"
    probation: bool = False  # not aggregated, but every valid update was scored (trust can recover)

    @property
    def aggregated_sites(self) -> list:
        return [s for s, w in self.weights.items() if w > 0]

    def weighted_site_metric(self, results: Sequence[SiteResult], name: str) -> float:
        """Mean of a metric the aggregated sites reported, weighted by their capped counts (NaN if none has it): a
        site claiming more samples does not weigh more in the round's score than in the model."""
        pairs = []
        for r in results:
            if self.weights.get(r.site, 0) > 0:
                v = (r.metrics or {}).get(name)
                if v is not None and isinstance(v, (int, float, np.floating)) and math.isfinite(float(v)):
                    pairs.append((float(v), self.used_samples[r.site]))
        total = sum(n for _, n in pairs)
        return sum(v * n for v, n in pairs) / total if pairs and total > 0 else float("nan")


class Examined(NamedTuple):
    """What screening found of one result (RoundEngine._examine_all): why it is rejected (None: valid), and for a
    valid update its hash, its distance to the global model, its move's (sign balance, coordinates moved) and its
    values at the collusion sketch's coordinates (None where not taken: the rules then read the update again)."""

    problem: Optional[str] = None
    sha: Optional[str] = None
    norm: Optional[float] = None
    balance: Optional[tuple] = None
    sketch: Optional[np.ndarray] = None


def _names_shapes_match(params, reference: Mapping[str, np.ndarray]) -> bool:
    """params has exactly the reference's names, each with its shape, and numbers only (fedmed.server.passes.update_pass
    can read it)."""
    if not isinstance(params, Mapping) or params.keys() != reference.keys():
        return False
    for k, ref in reference.items():
        v = np.asarray(params[k])
        if v.shape != np.shape(ref) or v.dtype.kind not in "biuf":
            return False
    return True


def finite_or_none(v):
    """float(v) when it is a finite number (not a bool), else None: what a site reports may be anything."""
    try:
        return float(v) if v is not None and not isinstance(v, bool) and math.isfinite(float(v)) else None
    except (TypeError, ValueError):
        return None


class RoundEngine:
    """Holds what persists between rounds (trust, the hashes of every update seen this job) and runs step()."""

    def __init__(
        self,
        rules: RoundRules,
        encryption: Optional[EncryptionSpec] = None,
        trust: Optional[Mapping[str, SiteTrust]] = None,
        validate=None,
    ):
        """validate(params) -> score: the server's own validation of a clear model (None: no such set, or HE on,
        where the server cannot read the head)."""
        kernels.warm_up()  # numba's start-up at the job's start, not in round 1 (fedmed.server.kernels)
        if encryption is not None:
            check_encryption_compatible(rules.aggregation)
            if rules.centred_clipping:
                raise ValueError(
                    "centred_clipping cannot be used with HE: it clips around the server's momentum, which the "
                    "server cannot form for the encrypted layers"
                )
        self.rules = rules
        self.encryption = encryption
        self.trust: dict[str, SiteTrust] = dict(trust or {})
        self._aggregate = get_aggregator(rules.aggregation)
        self._seen: dict[str, tuple] = {}  # update hash -> (site, round) that first sent it, this job
        self._validate = validate
        self._collusion = CollusionTracker(rules.near_copy_ratio)
        self._momentum: Optional[dict] = None  # the last committed move (centred_clipping)
        self._fedopt = FedOpt(rules.server_optimizer) if rules.server_optimizer.active else None
        self._scaffold: Optional[ScaffoldServer] = None  # SCAFFOLD's c, over the clear weights (first step)

    def control(self, global_params: Mapping[str, np.ndarray]) -> Optional[dict]:
        """SCAFFOLD: the server control variate to send with this global model (zeros before the first round);
        None without SCAFFOLD. Over the clear weights: the HE layers get none (fedmed.learning.algorithms)."""
        if not self.rules.scaffold:
            return None
        if self._scaffold is None:
            self._scaffold = ScaffoldServer({k: np.shape(v) for k, v in global_params.items() if is_weight(k, v)})
        return {k: v.copy() for k, v in self._scaffold.c.items()}

    def is_quarantined(self, site: str) -> bool:
        state = self.trust.get(site)
        return state is not None and state.quarantined

    # -- 1. screening ---------------------------------------------------------------------------------------------

    def _find_encrypted_problem(self, r: SiteResult) -> Optional[str]:
        if self.encryption is None:
            return "update carries encrypted layers but this job has no he_layers" if r.encrypted is not None else None
        if r.encrypted is None:
            return f"no encrypted layers: this job requires {list(self.encryption.names)} to arrive CKKS-encrypted"
        from fedmed.security import ckks

        return ckks.find_encrypted_problem(
            r.encrypted, self.encryption.names, self.encryption.shapes, self.encryption.context
        )

    def find_problem(self, r: SiteResult, reference: Mapping[str, np.ndarray]) -> Optional[str]:
        """Why this result cannot be aggregated against the global model's clear part, or None."""
        return self._find_envelope_problem(r) or (
            find_update_problem(r.params, reference) or self._find_content_problem(r, reference)
        )

    def _find_envelope_problem(self, r: SiteResult) -> Optional[str]:
        """find_problem's checks before the parameters' values: the signature, the count, parameters at all."""
        if r.authentication is not None:
            return f"signature: {r.authentication}"
        problem = find_count_problem(r.claimed_samples)
        if problem:
            return problem
        return "no parameters" if r.params is None else None

    def _find_content_problem(self, r: SiteResult, reference: Mapping[str, np.ndarray]) -> Optional[str]:
        """find_problem's checks after find_update_problem's (names, shapes, finiteness)."""
        return (
            find_statistics_problem(r.params, reference, self.rules.statistics_factor)
            or find_metrics_problem(r.metrics)
            or self._find_encrypted_problem(r)
            or self._find_control_problem(r, reference)
        )

    def _find_control_problem(self, r: SiteResult, reference: Mapping[str, np.ndarray]) -> Optional[str]:
        if not self.rules.scaffold:
            return (
                "update carries a SCAFFOLD control-variate delta but this job runs no SCAFFOLD"
                if (r.control_delta is not None)
                else None
            )
        if r.control_delta is None:
            return "no SCAFFOLD control-variate delta: this job runs SCAFFOLD"
        problem = find_control_problem(r.control_delta, self._scaffold.c)  # c made before screening (step)
        return f"SCAFFOLD: {problem}" if problem else None

    def _examine_all(self, results: Sequence[SiteResult], reference: Mapping[str, np.ndarray]) -> list:
        """An Examined per result, the per-site work of screening (the checks, a BLAKE3 of the update, its distance
        to the global model, and what the sign rule and the near-copy test read of it), on the server's threads
        (fedmed.server.parallel): it is most of a round's cost with many sites. The order-dependent rules (replay,
        copies) stay in _screen. With HE, one thread: the encrypted checks use the one TenSEAL context.

        One pass over an update whose names and shapes are the global model's (fedmed.server.passes.update_pass)
        answers find_update_problem's finiteness test too, so find_problem's checks keep their order and their
        sentences; any other update takes find_problem's own walk."""
        keys = distance_keys(reference)
        layout = self._collusion.sketch_for(reference).layout()

        def examine(r: SiteResult) -> Examined:
            if r.unavailable is not None or r.refused is not None:
                return Examined()
            problem = self._find_envelope_problem(r)
            if problem is not None:
                return Examined(problem)
            if not _names_shapes_match(r.params, reference):  # find_problem's walk names what is wrong
                problem = find_update_problem(r.params, reference) or self._find_content_problem(r, reference)
                if problem is not None:
                    return Examined(problem)
                sha, norm = hash_and_norm(r.params, reference, keys)
                return Examined(None, update_blake3(sha, r.encrypted), norm)
            done = update_pass(r.params, reference, keys, layout, r.params_blake3)
            bad = next((k for k in reference if k in done.non_finite), None)
            problem = f"parameter {bad}: contains NaN or Inf" if bad else self._find_content_problem(r, reference)
            if problem is not None:
                return Examined(problem)
            sha = update_blake3(done.sha, r.encrypted)
            return Examined(None, sha, done.norm, balance_of(done.up, done.down), done.sketch)

        return thread_map(examine, results, 1 if self.encryption is not None else None)

    def _screen(
        self,
        round_num: int,
        results: Sequence[SiteResult],
        targets: Sequence[str],
        reference: Mapping[str, np.ndarray],
        log: list,
        missing_reasons: Mapping[str, str],
    ):
        valid: dict[str, SiteResult] = {}
        records: dict[str, UpdateRecord] = {}
        hashes: dict[str, str] = {}
        found: dict[str, Examined] = {}  # valid site -> what screening's pass found
        examined = self._examine_all(results, reference)
        for r, ex in zip(results, examined):
            problem, update_sha, norm = ex.problem, ex.sha, ex.norm
            privacy = {
                k: finite_or_none((r.privacy or {}).get(k))
                for k in ("epsilon", "delta", "epsilon_budget", "noise_multiplier")
            }
            if r.site in records:
                log.append(("warning", f"second result from {r.site} this round ignored"))
                continue
            if r.unavailable is not None:  # not the site's choice and not its update: it is missing, with the reason
                reason = f"set-up failed at the site: {str(r.unavailable)[:480]}"
                log.append(("warning", f"{r.site} cannot take part: {reason}"))
                records[r.site] = UpdateRecord(site=r.site, status="missing", reason=reason)
                continue
            if r.refused is not None:
                reason = str(r.refused)[:500]
                log.append(("warning", f"{r.site} refused the round: {reason}"))
                records[r.site] = UpdateRecord(
                    site=r.site,
                    status="refused",
                    reason=reason,
                    **{k: v for k, v in privacy.items() if k != "noise_multiplier"},
                )
                continue
            claimed = (
                r.claimed_samples
                if isinstance(r.claimed_samples, (int, np.integer)) and not isinstance(r.claimed_samples, bool)
                else 0
            )
            metrics = r.metrics if isinstance(r.metrics, Mapping) else {}
            common = dict(
                site=r.site,
                num_samples=int(min(max(claimed, 0), 2**31 - 1)),
                signature=r.signature,
                signed_digest=r.signed_digest,
            )
            reason, sha = problem, update_sha
            if reason is None:
                if sha in self._seen:
                    first_site, first_round = self._seen[sha]
                    reason = (
                        f"replay: identical to the update {first_site} sent in round {first_round + 1}"
                        if first_site == r.site or first_round != round_num
                        else f"identical to the update {first_site} sent this round (counted once)"
                    )
            if reason:
                log.append(("warning", f"update from {r.site} rejected: {reason}"))
                records[r.site] = UpdateRecord(status="rejected", reason=reason, update_blake3=sha, **common)
                continue
            self._seen[sha] = (r.site, round_num)
            hashes[r.site] = sha
            valid[r.site] = r
            found[r.site] = ex
            records[r.site] = UpdateRecord(
                status="accepted",
                update_norm=norm,
                update_blake3=sha,
                **privacy,
                train_loss=finite_or_none(metrics.get("train_loss")),
                val_loss=finite_or_none(metrics.get("val_loss")),
                val_mean_auroc=finite_or_none(metrics.get("val_mean_auroc")),
                metrics={k: float(v) for k, v in metrics.items() if finite_or_none(v) is not None},
                **common,
            )
        for site in [*targets, *(s for s in missing_reasons if s not in targets)]:
            if site not in records:
                reason = missing_reasons.get(site) or "no result before the round closed"
                log.append(("warning", f"no result from {site} this round: {reason}"))
                records[site] = UpdateRecord(site=site, status="missing", reason=reason[:500])
        return valid, records, found

    # -- 2.-4. aggregate, combine, score ----------------------------------------------------------------------------

    def step(
        self,
        round_num: int,
        global_params: Mapping[str, np.ndarray],
        results: Sequence[SiteResult],
        targets: Sequence[str] = (),
        missing_reasons: Optional[Mapping[str, str]] = None,
    ) -> RoundReport:
        """One round. global_params: the clear part of the global model the sites were sent (the reference every
        update is checked against); results: what came back; targets: the sites that were asked (those with no
        result are recorded missing); missing_reasons: site -> why it gave no result, when the caller knows (its
        connection was dropped); a site named here but not asked is recorded missing too."""
        log: list = []
        if self.rules.scaffold:
            self.control(global_params)  # c exists before the sites' deltas are screened against it (threads)
        valid, records, found = self._screen(round_num, results, targets, global_params, log, missing_reasons or {})
        head_keys = [
            k
            for k in sorted(global_params)
            if k.startswith(tuple(self.rules.head_layers))
            and np.issubdtype(np.asarray(global_params[k]).dtype, np.floating)
        ]
        if self._validate is not None and len(valid) >= 3:
            self._screen_by_validation(valid, records, log)
        copies = self._find_near_copies(valid, global_params, records, log, found)
        balances = {s: f.balance for s, f in found.items() if f.balance is not None}
        norms = {s: f.norm for s, f in found.items() if f.norm is not None}
        direction = dict(direction=DirectionCheck(global_params, tuple(head_keys), balances, norms), copies=copies)
        combined, outcome = None, None
        while True:
            active = [s for s in valid if not self.is_quarantined(s)]
            if len(active) < self.rules.min_clients:
                problem = (
                    f"round {round_num + 1}: {len(active)} valid, trusted update(s), min_clients is "
                    f"{self.rules.min_clients}; not aggregating (the global model is left unchanged)"
                )
                probation = None
                if len(valid) >= self.rules.min_clients:
                    # Quarantine holds back too many sites to aggregate. Score every valid update against the
                    # robust aggregate of all of them (committing nothing), so quarantined sites that behave can
                    # earn re-admission: otherwise a federation whose sites were all quarantined once (a bad
                    # release at every site) could never aggregate again.
                    probation = aggregate_and_score(
                        {s: r.params for s, r in valid.items()},
                        {s: int(r.claimed_samples) for s, r in valid.items()},
                        self._aggregate,
                        self.rules.trust,
                        list(valid),
                        self.rules.min_clients,
                        **direction,
                    )
                    log.append(
                        (
                            "warning",
                            f"probation round: {len(valid)} valid update(s) scored against their "
                            "own robust aggregate; the global model is not changed",
                        )
                    )
                return self._finish(round_num, records, probation, None, log, problem, copies=copies)
            outcome = aggregate_and_score(
                {s: r.params for s, r in valid.items()},
                {s: int(r.claimed_samples) for s, r in valid.items()},
                self._aggregate,
                self.rules.trust,
                active,
                self.rules.min_clients,
                **direction,
            )
            turned = self._would_turn_on_majority(outcome, valid)
            if turned:
                return self._hold(round_num, records, outcome, log, turned, copies)
            if self.rules.centred_clipping:
                outcome = self._clip_around_momentum(outcome, valid, global_params)
            if self.encryption is None:
                break
            combined, failed = self._combine_encrypted(valid, outcome.weights)
            if not failed:
                break
            for site, reason in failed.items():  # that site's block broke the sum: reject it, aggregate again
                log.append(("warning", f"update from {site} rejected: {reason}"))
                combined = None
                records[site] = replace(records[site], status="rejected", reason=reason)
                del valid[site]
        outcome = self._optimise(outcome, valid, global_params, max(len(set(targets) | set(valid)), 1), log)
        return self._finish(round_num, records, outcome, combined, log, None, copies=copies)

    def _optimise(self, outcome, valid: Mapping[str, SiteResult], global_params, num_sites: int, log: list):
        """A committed round's server-side algorithms (fedmed.learning.algorithms): SCAFFOLD's c moved by the kept sites'
        deltas with the aggregator's weights, then FedOpt's step from the global model along global - aggregate."""
        diagnostics = dict(outcome.result.diagnostics)
        params = outcome.result.params
        if self.rules.scaffold:
            deltas = {s: r.control_delta for s, r in valid.items()}
            info = self._scaffold.update(deltas, outcome.weights, num_sites)
            if info["clipped"]:
                log.append(("info", f"SCAFFOLD: control-variate deltas of {', '.join(info['clipped'])} clipped"))
            diagnostics["scaffold"] = info
        if self._fedopt is not None:
            params = self._fedopt.step(global_params, params)
            diagnostics["server_optimizer"] = {"kind": self.rules.server_optimizer.kind, "step": self._fedopt.steps}
        return replace(outcome, result=replace(outcome.result, params=params, diagnostics=diagnostics))

    def _clip_around_momentum(self, outcome, valid: Mapping[str, SiteResult], global_params):
        """The kept sites combined by centred clipping around global + momentum (RoundRules.centred_clipping); the
        aggregator's BatchNorm statistics kept. The momentum becomes this round's move (committed by the caller)."""
        kept = [s for s, w in outcome.weights.items() if w > 0]
        clip = centred_clip(
            [valid[s].params for s in kept], [outcome.used_counts[s] for s in kept], global_params, self._momentum
        )
        params = {**outcome.result.params, **clip.params}
        weights = {s: 0.0 for s in outcome.weights}
        weights.update({s: float(c) for s, c in zip(kept, clip.coefficients[1:])})
        diagnostics = {
            **outcome.result.diagnostics,
            "centred_clipping": {"radius": clip.radius, "momentum_weight": float(clip.coefficients[0])},
        }
        self._momentum = committed_move(params, global_params)
        return replace(outcome, result=replace(outcome.result, params=params, diagnostics=diagnostics), weights=weights)

    def _find_near_copies(self, valid: Mapping[str, SiteResult], reference, records: dict, log: list, found):
        """Near-copy groups among the valid updates (fedmed.server.robust.collusion): each member keeps its status, with
        the reason recorded, and shares one site's weight with its group. found: site -> Examined (the sketches
        screening's pass gathered)."""
        sampled = {s: found[s].sketch for s in valid if s in found and found[s].sketch is not None}
        finding = self._collusion.observe({s: r.params for s, r in valid.items()}, reference, sampled)
        for site, reason in finding.reasons.items():
            log.append(("warning", f"update from {site}: {reason}"))
            records[site] = replace(records[site], reason=reason)
        return finding

    def _would_turn_on_majority(self, outcome, valid: Mapping[str, SiteResult]) -> tuple:
        """The valid sites this round's rules would reject (excluded) or newly quarantine, when they are half of the
        valid sites or more; () otherwise. An honest majority is the assumption every rule rests on: a verdict
        against half or more of the sites says the reference was captured (issue 28: two colluders of five held
        the aggregate and the rules measured against it rejected the honest three), not that most hospitals
        turned hostile at once."""
        scores = {s: sc for s, (_, sc) in outcome.scored.items() if s in valid}
        _, events = update_trust(self.trust, scores, self.rules.trust)
        flagged = set(outcome.excluded) | {s for s, kind, _ in events if kind == "quarantined"}
        return tuple(sorted(flagged)) if flagged and 2 * len(flagged) >= len(valid) else ()

    def _hold(self, round_num, records, outcome, log, flagged, copies) -> RoundReport:
        """Not committed: the global model stands, no valid site's trust changes (the screening rejections still
        count), every flagged site gets an alert naming the suspicion. Reported as a probation round, so the
        callers go on to the next round as they do when quarantine leaves too few sites."""
        valid = [s for s, u in records.items() if u.status == "accepted"]
        groups = copies.groups
        collusion = f"; near-copy groups: {', '.join('+'.join(g) for g in groups)}" if groups else ""
        problem = (
            f"round {round_num + 1} not committed: the rules would reject or quarantine {', '.join(flagged)}, "
            f"{len(flagged)} of {len(valid)} valid sites (half or more), so a minority has likely captured the "
            f"reference{collusion}; the global model is kept"
        )
        log.append(("warning", problem))
        report = self._finish(round_num, records, outcome, None, log, problem, flagged, copies)
        alerts = report.alerts + tuple(AlertRecord(s, "suspicion", problem[:500]) for s in flagged)
        return replace(report, alerts=alerts)

    def _screen_by_validation(self, valid: dict, records: dict, log: list) -> None:
        """Score each valid update on the server's validation set; reject those more than validation_margin below
        the median site's score (needs 3 or more updates: a median of two is their mean)."""
        scores = {s: float(self._validate(r.params)) for s, r in valid.items()}
        median = float(np.median(list(scores.values())))
        for site, score in scores.items():
            if score < median - self.rules.validation_margin:
                reason = (
                    f"validation score {score:.3f} on the server's set is {median - score:.3f} below the median "
                    f"site's {median:.3f} (at most {self.rules.validation_margin} allowed)"
                )
                log.append(("warning", f"update from {site} rejected: {reason}"))
                records[site] = replace(records[site], status="rejected", reason=reason)
                del valid[site]

    def _combine_encrypted(self, valid: Mapping[str, SiteResult], weights: Mapping[str, float]):
        """(combined block, {site: reason} for blocks that failed): each site's contribution is added under its
        own guard, so one block that passed screening but still fails costs that site, not the round."""
        from fedmed.security import ckks

        blocks = {s: ckks.EncryptedLayers.from_wire(r.encrypted) for s, r in valid.items() if weights.get(s, 0.0) > 0}
        return ckks.guarded_weighted_sum(blocks, weights, self.encryption.context)

    def _why_excluded(
        self, site: str, scored: Mapping, cos: Mapping, signs: Mapping, body: Optional[Mapping] = None
    ) -> str:
        """body: the body cosines the round scored (None or {} when the body rule did not score)."""
        ratio, policy, body = scored[site][0], self.rules.trust, body or {}
        if ratio >= policy.bad_ratio:
            return f"far outlier this round: {ratio:.1f}x the median distance to the coordinate median of the sites"
        if abs(signs.get(site, 0.0)) >= policy.sign_balance_bad:
            return (
                f"its move's signs are skewed: sign balance {signs[site]:+.2f} from the median site's (at most "
                f"{policy.sign_balance_bad} scores 0; honest moves go up and down about equally, a crafted shift "
                "of every coordinate at once does not)"
            )
        if site in body and (site not in cos or body[site] <= policy.body_cosine_bad):
            return (
                "its clear layers moved against the coordinate median of the sites' this round "
                f"(cosine {body[site]:+.2f}, at most {policy.body_cosine_bad} scores 0)"
            )
        return (
            "its classifier layers moved against the coordinate median of the sites' this round "
            f"(cosine {cos.get(site, float('nan')):+.2f}, "
            f"at most {policy.head_cosine_bad} scores 0)"
        )

    def _finish(self, round_num, records, outcome, combined, log, problem, held=None, copies=None) -> RoundReport:
        """held: the flagged sites of a round not committed (_hold), None otherwise; copies: this round's
        CollusionFinding, whose groups are alerted."""
        hold = held is not None
        alerts: list = []
        weights, used, diagnostics, params = {}, {}, {}, None
        scores = {s: 0.0 for s, u in records.items() if u.status == "rejected"}  # a rejected update scores 0
        dist, scored, excluded, cos, signs, body, judged_body = {}, {}, (), {}, {}, {}, {}
        if outcome is not None:
            dist, scored, excluded, cos = outcome.distances, outcome.scored, outcome.excluded, outcome.head_cosines
            signs, body = outcome.sign_offsets, outcome.body_cosines
            judged_body = body if outcome.body_scored else {}
            if problem is None:  # a probation round (problem set) commits no weights and no model
                weights, used = outcome.weights, outcome.used_counts
                diagnostics, params = dict(outcome.result.diagnostics), outcome.result.params
            if not hold:  # a held round changes no valid site's trust
                scores.update({s: sc for s, (_, sc) in scored.items()})
            for s in excluded:
                left = "would have been left out of" if hold else "left out of"
                log.append(
                    (
                        "warning",
                        f"{s} {left} this round's aggregate: {self._why_excluded(s, scored, cos, signs, judged_body)}",
                    )
                )
        was_quarantined = {s for s in scores if self.is_quarantined(s)}
        self.trust, events = update_trust(self.trust, scores, self.rules.trust)
        for site, u in list(records.items()):
            if hold and u.status == "accepted":
                records[site] = replace(
                    u,
                    reason="valid, but the round was not committed"
                    + (": the rules would have rejected or quarantined it" if site in held else ""),
                    distance=dist.get(site),
                    round_score=scored[site][1] if site in scored else None,
                    trust=self.trust[site].trust if site in self.trust else None,
                    aggregation_weight=0.0,
                )
                continue
            if site not in scores:
                continue
            status, reason = u.status, u.reason
            if status == "accepted" and site in was_quarantined:
                status, reason = (
                    "quarantined",
                    f"quarantined (trust {self.trust[site].trust:.3f}): scored, not aggregated",
                )
            elif status == "accepted" and site in excluded:
                status, reason = "rejected", self._why_excluded(site, scored, cos, signs, judged_body)
            elif status == "accepted" and (outcome is None or problem is not None):
                reason = "valid, but the round was not aggregated"
            records[site] = replace(
                u,
                status=status,
                reason=reason,
                distance=dist.get(site),
                round_score=scores[site],
                trust=self.trust[site].trust,
                aggregation_weight=weights.get(site, 0.0),
                weight_samples=used.get(site),
            )
            if site in scored:
                direction = f", head cosine {cos[site]:+.2f}" if site in cos else ""
                direction += f", sign balance {signs[site]:+.3f}" if site in signs else ""
                direction += f", body cosine {body[site]:+.3f}" if site in body else ""
                log.append(
                    (
                        "info",
                        f"site {site}: distance {dist[site]:.4g} (x{scored[site][0]:.2f} median)"
                        f"{direction}, score {scores[site]:.2f}, trust {self.trust[site].trust:.3f}, "
                        f"{status}",
                    )
                )
        alerts = [
            AlertRecord(s, u.status, u.reason or "") for s, u in records.items() if u.status in ("rejected", "refused")
        ]
        for site, kind, msg in events:
            log.append(("warning", msg))
            alerts.append(AlertRecord(site, kind, msg))
        for site, reason in (copies.reasons if copies is not None else {}).items():
            alerts.append(AlertRecord(site, "collusion", reason[:500]))
        return RoundReport(
            round_num,
            outcome is not None and problem is None,
            params,
            combined,
            tuple(records.values()),
            tuple(alerts),
            weights,
            used,
            diagnostics,
            problem,
            tuple(log),
            probation=outcome is not None and problem is not None,
        )
