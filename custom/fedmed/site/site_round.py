"""One hospital's round, once: accept the global model, train, validate, and build the signed, encrypted update.

Pure core (no NVFlare import). The NVFlare Executor (fedmed.flare.executor) converts the FLModel it receives into a
GlobalModel, calls run_round and converts the SiteUpdate back; the in-process federation used by the red team and
the benchmarks (fedmed.sim.inprocess) calls the very same run_round, so their figures describe what hospitals run.

In order:
1. accept the global model: the server's signature for this job and round (when the site holds the server's key),
   freshness (a round not later than the last one this site accepted in the job is a replay and is refused), the
   encrypted head decrypted with the site's key and checked against the last head it accepted;
2. train from it: DP-SGD under the site's policy (the ledger is charged before the data is read) or plain Adam;
3. validate on the site's validation set (when it has one) and keep only the metrics its policy releases;
4. put into the update what the site vouches for to the federation (vouch: its privacy ledger's head, the last
   audit receipt it saw; fedmed.server.anchors), apply a rehearsal attack when the site is configured hostile, encrypt
   the head, sign the update.

A refusal (the global model rejected, the privacy budget or ledger says no) comes back as a SiteUpdate whose
`refused` says why, for the server to record; a bad signature raises fedmed.security.signing.SignatureError.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from torch.utils.data import Subset

from fedmed.job import constants as C
from fedmed.learning import algorithms
from fedmed.learning.training import LocalTraining, evaluate, round_lr, round_share, train_epochs
from fedmed.models.model_health import COLLAPSED_SPREAD, check_outputs, probe_images
from fedmed.models.network import load_numpy_state, state_to_numpy
from fedmed.privacy.dp_sgd import BudgetExceeded
from fedmed.privacy.ledger import LedgerError
from fedmed.security import signing
from fedmed.server.rounds import SiteResult, finite_or_none
from fedmed.sim.attacks import apply_attack

# The privacy spend a site reports in meta, covered by its signature (the user-level filter adds the last two).
SIGNED_PRIVACY_KEYS = (
    C.META_EPSILON,
    C.META_DELTA,
    C.META_EPSILON_BUDGET,
    C.META_NOISE_MULTIPLIER,
    C.META_UPDATE_CLIP_NORM,
    C.META_UPDATE_NOISE_MULTIPLIER,
    C.META_LIFETIME_EPSILON,
    C.META_LEDGER_HEAD,  # what the site vouches for to the federation (fedmed.server.anchors)
    C.META_RECEIPT_SEEN,
)
# meta key -> the round engine's SiteResult.privacy key
RECEIVED_PRIVACY_KEYS = {
    "epsilon": C.META_EPSILON,
    "delta": C.META_DELTA,
    "epsilon_budget": C.META_EPSILON_BUDGET,
    "noise_multiplier": C.META_NOISE_MULTIPLIER,
}


class GlobalModelRejected(Exception):
    """The global model this site was sent fails its own checks; the message says why."""


def site_seed(seed: int, round_num: int, site: str) -> int:
    """Per-round, per-site seed, so sites don't share augmentation or shuffle streams (DP-SGD's sampling and noise
    come from the OS, not from it)."""
    return seed + 1000 * round_num + sum(site.encode())


@dataclass(frozen=True)
class Training:
    """How a site trains each round (the job's settings). trainable: parameter-name prefixes trained (None = all);
    the rest stay at the global model's values."""

    lr: float = 1e-3  # Adam's learning rate of round 1, cosine-decayed to 10% by the last round
    batch_size: int = 16
    local_epochs: int = 1
    seed: int = 0
    trainable: Optional[tuple] = None
    proximal_mu: float = 0.0  # FedProx: mu of the proximal term mu/2 ||w - w_global||^2 (0 = off)
    scaffold: bool = False  # SCAFFOLD's control variates (fedmed.learning.algorithms)
    rounds_per_epoch: int = 1  # k > 1: one epoch over k rounds, a 1/k share each (fedmed.learning.training)


@dataclass
class Site:
    """One hospital for the length of a job: what it trains on and with, and what it remembers between rounds.

    model: the module trained in place (the in-process federation shares one among its sites). privacy: the site's
    fedmed.privacy.dp_sgd.SitePrivacy, None = plain training. ledger: its LedgerBinding when only a user-level
    filter spends from it (DP-SGD's own charge goes through `privacy`). also_released(): RDP entries of what else the
    round releases from the same data (the user-level filter's), checked with DP-SGD's part. he / he_names: the
    site's CKKS context (with the secret key) and the names it encrypts. sign_keys / server_key: sign the update and
    accept only a global model the server signed. hostile: a rehearsal attack (fedmed.sim.attacks)."""

    name: str
    task: object  # fedmed.job.tasks.TaskSpec
    train: object  # a torch Dataset
    model: object  # torch.nn.Module
    training: Training = field(default_factory=Training)
    val: object = None  # a torch Dataset, or None: no validation metrics
    privacy: object = None
    ledger: object = None
    also_released: Callable[[], Sequence] = tuple
    he: object = None  # fedmed.security.ckks.LoadedContext
    he_names: tuple = ()
    sign_keys: Optional[signing.SiteKeys] = None
    server_key: Optional[signing.PublicKeys] = None
    hostile: object = None  # fedmed.sim.attacks.Attack
    data_synthetic: Optional[bool] = None
    # What the site remembers between rounds of the job:
    last_head: Optional[dict] = None  # the last decrypted global head it accepted
    last_round: Optional[int] = None  # the last round whose global model it accepted for training
    last_local: Optional[dict] = None  # its last released local model, in clear (what cross-site evaluation lends)
    control: Optional[dict] = None  # SCAFFOLD: its control variate c_i (fedmed.learning.algorithms)
    last_receipt: Optional[dict] = None  # the last audit receipt it saw (this job's, or its receipt log's last)


@dataclass(frozen=True)
class GlobalModel:
    """The global model as the site received it. round_num counts from 0; encrypted: the CKKS block as sent."""

    params: Mapping
    round_num: int
    total_rounds: int = 1
    job_id: str = ""
    encrypted: Optional[Mapping] = None
    signature: object = None  # the server's signature (meta fedmed_global_signature)
    control: Optional[Mapping] = None  # SCAFFOLD: the server's control variate c (name -> array)
    ledger_seen: Optional[int] = None  # the ledger entry count the record holds for this site (meta fedmed_ledger_seen)
    receipt: Optional[Mapping] = None  # the record's head after the previous round, signed (meta fedmed_audit_receipt)


@dataclass
class SiteUpdate:
    """What the site sends back: clear params (encrypted layers removed), released metrics, and the wire meta
    (constants' META_* keys: sample count, privacy spend, encrypted block, signature, or `refused`)."""

    params: Optional[dict]
    metrics: dict
    meta: dict
    base: Optional[dict] = None  # the global model in clear it was trained from, for the adapter's filters; not sent

    @property
    def refused(self) -> Optional[str]:
        return self.meta.get(C.META_REFUSED)


def verify_global(site: Site, offer: GlobalModel, signed_round: int) -> None:
    """Raises fedmed.security.signing.SignatureError unless the server signed exactly this model for this job and round
    (nothing to check when the site holds no server key)."""
    if site.server_key is None:
        return
    try:
        digest = signing.global_model_digest(offer.job_id, signed_round, offer.params or {}, offer.encrypted)
    except ValueError as e:  # malformed params or encrypted block: nothing that could have been signed
        raise signing.SignatureError(f"cannot verify the global model: {e}") from None
    signing.verify_global_model(digest, offer.signature, site.server_key)


def open_global(site: Site, offer: GlobalModel) -> dict:
    """The global model in clear: its encrypted layers (if any) decrypted with the site's key, the head checked."""
    if offer.encrypted is None:
        if site.he is not None and all(n in offer.params for n in site.he_names):
            site.last_head = {n: offer.params[n] for n in site.he_names}  # round 1's public head
        return dict(offer.params)  # no HE, or round 1's freshly initialised (public) model
    if site.he is None:
        raise ValueError("the global model carries encrypted layers but this site's job has no he_layers")
    from fedmed.security import ckks

    clear = {k: v for k, v in offer.params.items() if k not in site.he_names}
    params = ckks.merge_decrypted(clear, offer.encrypted, site.he)
    # The server combined ciphertexts it cannot read, so it cannot bound a site that scaled its own head; this
    # hospital can, and refuses to train on (or keep) a head that is not finite or jumped in one round.
    head = {n: params[n] for n in site.he_names}
    problem = ckks.find_global_head_problem(head, site.last_head)
    if problem:
        raise GlobalModelRejected(problem)
    site.last_head = head
    return params


def check_fresh(site: Site, round_num: int) -> None:
    """Raises GlobalModelRejected when the round is not later than the last one the site accepted in this job: a
    server-signed model of an earlier round, replayed, verifies (it was signed for that round), so only the site's
    own memory of what it accepted can refuse it."""
    if site.last_round is not None and round_num <= site.last_round:
        raise GlobalModelRejected(
            f"stale global model: round {round_num + 1} is not later than round {site.last_round + 1}, the last "
            "this site accepted in this job (a replayed or reordered global model)"
        )


def check_usable(site: Site) -> None:
    """Raises GlobalModelRejected when the loaded global model's outputs are not finite, or the same for every input,
    on fixed probe images of the site's image shape (fedmed.models.model_health, the server's own check): training on it
    would only spend privacy budget, and the site's refusal names the problem in the record in that round."""
    sample = (site.val if site.val is not None and len(site.val) else site.train)[0][0]
    check = check_outputs(site.model, probe_images(int(sample.shape[-1]), int(sample.shape[0])))
    if check.non_finite:
        raise GlobalModelRejected(
            f"its outputs are not finite (NaN or infinite) on {check.non_finite} of {check.images} probe images"
        )
    if check.spread < COLLAPSED_SPREAD:
        raise GlobalModelRejected(
            f"it has collapsed: its outputs are the same for all {check.images} probe images (spread {check.spread:.1e})"
        )


def run_round(
    site: Site,
    offer: GlobalModel,
    should_abort: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = lambda message: None,
) -> SiteUpdate:
    """One round at one hospital (module docstring). log(message) receives what the adapter should log."""
    verify_global(site, offer, offer.round_num)  # before decrypting or training on anything
    try:
        check_fresh(site, offer.round_num)
        global_params = open_global(site, offer)
        load_numpy_state(site.model, global_params)
        check_usable(site)
        if site.training.scaffold:
            check_control(site, offer, global_params)
    except GlobalModelRejected as e:
        log(f"site {site.name}: refusing round: {e}")
        return SiteUpdate(None, {}, {C.META_REFUSED: f"global model rejected: {e}", C.META_SITE: site.name})
    site.last_round = offer.round_num
    if site.training.scaffold and list(site.also_released()):
        reason = (
            "SCAFFOLD with a user-level noise filter: the control-variate change is computed from the model before "
            "the filter's noise and would be released past it; run SCAFFOLD with DP-SGD, or without the filter"
        )
        log(f"site {site.name}: refusing round: {reason}")
        return _refusal(site, reason)
    k, images = site.training.rounds_per_epoch, len(site.train)
    if k > images:  # a share of under one image a round: refused with the reason, not an exception at the server
        reason = (
            f"the job's rounds_per_epoch {k} splits an epoch into more shares than this site has training images "
            f"({images}); a round would train on nothing"
        )
        log(f"site {site.name}: refusing round: {reason}")
        return _refusal(site, reason)
    if isinstance(offer.receipt, Mapping):
        site.last_receipt = dict(offer.receipt)
    try:
        if site.privacy is None and site.ledger is not None:  # only a user-level filter spends: check its part now
            site.ledger.check(list(site.also_released()))
        update = _train_and_validate(site, offer, global_params, should_abort, log)
        update.base = global_params
        vouch(site, offer.ledger_seen, update.meta)
    except (BudgetExceeded, LedgerError) as e:  # before training: a ceiling, or a ledger damaged since start-up
        log(f"site {site.name}: refusing round: {e}")
        return _refusal(site, str(e))
    if site.hostile is not None:
        update.params = apply_attack(update.params, global_params, site.hostile, offer.round_num)
    site.last_local = dict(update.params)  # in clear, before any encryption: what cross-site evaluation lends
    if site.he is not None:
        _encrypt(site, offer.round_num, update, log)
    if site.sign_keys is not None:
        sign_update(update, offer.job_id, offer.round_num, site.name, site.sign_keys)
    return update


def seen_count(counts, site: str) -> Optional[int]:
    """This site's entry in the global model's {site: ledger entry count the record holds}; anything else: None."""
    count = counts.get(site) if isinstance(counts, Mapping) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def vouch(site: Site, ledger_seen: Optional[int], meta: dict) -> None:
    """Put into the update's meta (signed with it) what the site vouches for to the federation (fedmed.server.anchors): its
    ledger's head, with the line at the count the record held before (ledger_seen), and the last audit receipt it
    saw. Raises LedgerError when the ledger no longer verifies (the round is then refused)."""
    binding = site.privacy.ledger if site.privacy is not None else site.ledger
    if binding is not None:
        meta[C.META_LEDGER_HEAD] = binding.head_report(ledger_seen).to_wire()
    if site.last_receipt is not None:
        meta[C.META_RECEIPT_SEEN] = dict(site.last_receipt)


def _refusal(site: Site, reason: str) -> SiteUpdate:
    """A refusal on privacy grounds, with the spend so far (the server records it beside the reason)."""
    meta = {C.META_REFUSED: reason, C.META_SITE: site.name}
    if site.privacy is not None:
        meta.update(
            {
                C.META_EPSILON: site.privacy.epsilon_spent,
                C.META_DELTA: site.privacy.policy.delta,
                C.META_EPSILON_BUDGET: site.privacy.policy.epsilon,
            }
        )
    return SiteUpdate(None, {C.META_EPSILON: meta.get(C.META_EPSILON, 0.0)}, meta)


def _train_and_validate(site: Site, offer: GlobalModel, global_params: Mapping, should_abort, log) -> SiteUpdate:
    t0 = time.monotonic()
    tr, r, total = site.training, offer.round_num, offer.total_rounds
    lr = round_lr(tr.lr, min(r, total - 1), total)
    seed = site_seed(tr.seed, r, site.name)
    if hasattr(site.train, "reseed"):  # restart augmentation: a site's round sees the same images on a rerun
        site.train.reseed(seed)
    data = site.train
    if site.hostile is not None and site.hostile.poisons_labels:
        data = copy.copy(site.train)  # the rehearsal's poisoned labels, leaving the shared dataset as it was
        data.labels = site.task.poisoned_labels(site.train.labels)
    privacy_meta = {}
    settings = LocalTraining(
        tr.local_epochs, lr, tr.batch_size, seed, tr.trainable, total * tr.local_epochs, tr.rounds_per_epoch
    )
    if tr.rounds_per_epoch > 1 and site.privacy is None:  # DP-SGD takes its share as Poisson draws instead
        share = round_share(len(data), r, tr.rounds_per_epoch, tr.seed + sum(site.name.encode()))
        data = Subset(data, share.tolist())
    correction = _local_correction(site, global_params, lr, offer.control)
    if site.privacy is not None:
        trained, dp = site.privacy.train_round(
            site.model,
            data,
            settings,
            should_abort=should_abort,
            task=site.task,
            round_num=r,
            also_released=list(site.also_released()),
            correction=correction,
        )
        site.model.load_state_dict(trained.state_dict())
        train_loss = dp.train_loss
        privacy_meta = {
            C.META_EPSILON: dp.epsilon,
            C.META_DELTA: dp.delta,
            C.META_EPSILON_BUDGET: site.privacy.policy.epsilon,
            C.META_NOISE_MULTIPLIER: dp.noise_multiplier,
        }
        if dp.lifetime_epsilon is not None:
            privacy_meta[C.META_LIFETIME_EPSILON] = dp.lifetime_epsilon
        log(
            f"site {site.name} round {r + 1}: DP-SGD {dp.steps} steps, sigma {dp.noise_multiplier:.3f}, epsilon "
            f"spent {dp.epsilon:.3f} of {site.privacy.policy.epsilon}"
        )
    else:
        train_loss = train_epochs(
            site.model,
            data,
            settings,
            should_abort=should_abort,
            on_epoch_end=lambda e, loss: log(
                f"site {site.name} round {r + 1}: epoch {e}/{tr.local_epochs} train loss {loss:.4f}"
            ),
            task=site.task,
            correction=correction,
        )
    metrics = {C.META_TRAIN_LOSS: train_loss}
    if site.val is not None:
        val = evaluate(site.model, site.val, site.task)
        log(
            f"site {site.name} round {r + 1}: val loss {val.loss:.4f} {site.task.score_name} {val.score:.4f} "
            f"({_samples(len(data), len(site.train))}, lr {lr:.2e}, {time.monotonic() - t0:.0f}s)"
        )
        metrics.update({C.META_VAL_LOSS: val.loss, C.META_VAL_MEAN_AUROC: val.mean_auroc})
        metrics.update({C.META_VAL_PREFIX + k: v for k, v in val.metrics.items()})
    # A metric the site could not compute (AUROC is NaN on a validation set that lacks a class) is left out: the
    # server records nothing for it anyway, and a signed update can only carry finite numbers (fedmed.security.signing).
    metrics = {k: finite_or_none(v) for k, v in metrics.items() if finite_or_none(v) is not None}
    if site.privacy is not None and not site.privacy.policy.release_metrics:
        # The site's policy: nothing its epsilon does not cover leaves; the numbers stay in its own log above.
        metrics = {}
    meta = {
        C.META_NUM_SAMPLES: len(site.train),
        C.META_SITE: site.name,
        C.META_EPOCHS: tr.local_epochs if tr.rounds_per_epoch == 1 else 1 / tr.rounds_per_epoch,
        **privacy_meta,
        **({} if site.data_synthetic is None else {C.META_DATA_SYNTHETIC: site.data_synthetic}),
    }
    params = state_to_numpy(site.model)
    if site.training.scaffold:
        # From the released model y_i (DP-SGD's when the site trains with it), the global model and the control
        # variates: post-processing of what is released, no extra epsilon (fedmed.learning.algorithms).
        site.control, delta = algorithms.site_control_update(
            site.control, offer.control, global_params, params, max(correction.steps, 1), lr
        )
        meta[C.META_CONTROL_DELTA] = delta
    return SiteUpdate(params, metrics, meta)


def control_names(site: Site) -> tuple:
    """The parameters SCAFFOLD corrects: the model's parameters except the HE layers (a clear control variate of
    an encrypted layer would show the server the head's move that HE hides)."""
    return tuple(n for n, _ in site.model.named_parameters() if n not in site.he_names)


def check_control(site: Site, offer: GlobalModel, global_params: Mapping) -> None:
    """Raises GlobalModelRejected unless the offer carries a usable server control variate for SCAFFOLD."""
    if offer.control is None:
        raise GlobalModelRejected("SCAFFOLD: the global model came without the server's control variate")
    problem = algorithms.find_control_problem(offer.control, {n: global_params[n] for n in control_names(site)})
    if problem:
        raise GlobalModelRejected(f"SCAFFOLD: the server's control variate: {problem}")


def _local_correction(site: Site, global_params: Mapping, lr: float, control=None):
    """The round's fedmed.learning.algorithms.LocalCorrection, or None: FedProx's anchor is the global model the site
    accepted; SCAFFOLD corrects the clear trained parameters (control_names) by c - c_i."""
    tr = site.training
    if not tr.scaffold and tr.proximal_mu == 0:
        return None
    drift = None
    if tr.scaffold:
        names = control_names(site)
        if site.control is None:
            site.control = algorithms.zeros_like({n: global_params[n] for n in names})
        drift = algorithms.drift(control, site.control, names)
    return algorithms.LocalCorrection(site.model, global_params, tr.proximal_mu, drift, lr)


def _encrypt(site: Site, round_num: int, update: SiteUpdate, log) -> None:
    from fedmed.security import ckks

    t0 = time.monotonic()
    update.params, block = ckks.encrypt_selected(update.params, site.he_names, site.he)
    seconds = time.monotonic() - t0
    update.meta[C.META_ENCRYPTED] = block.to_wire()
    update.meta[C.META_HE_SECONDS] = seconds
    log(
        f"site {site.name} round {round_num + 1}: encrypted {block.num_values} values in {len(block.chunks)} CKKS "
        f"ciphertext(s), {block.nbytes / 1e6:.2f} MB, {seconds:.2f}s"
    )


def update_digest(params, metrics, meta, job_id: str, round_num: int, site: str) -> bytes:
    """The digest a site signs and the server verifies, from the update's fields as they cross the wire."""
    meta = meta or {}
    return signing.update_digest(
        job_id,
        round_num,
        site,
        params or {},
        meta.get(C.META_ENCRYPTED),
        int(meta.get(C.META_NUM_SAMPLES, 0)),
        metrics or {},
        {k: meta[k] for k in SIGNED_PRIVACY_KEYS if k in meta},
    )


def sign_update(update: SiteUpdate, job_id: str, round_num: int, site: str, keys: signing.SiteKeys) -> None:
    """Sign the update in place (meta[fedmed_signature]); after the last change to it."""
    update.meta.pop(C.META_SIGNATURE, None)
    digest = update_digest(update.params, update.metrics, update.meta, job_id, round_num, site)
    update.meta[C.META_SIGNATURE] = signing.sign(digest, keys)


def as_received(site: str, params, metrics, meta: Mapping) -> SiteResult:
    """What the round engine reads from an update's fields as they cross the wire (site: who sent it, from the
    authenticated connection where there is one)."""
    refused = meta.get(C.META_REFUSED)
    unavailable = meta.get(C.META_UNAVAILABLE)
    synthetic = meta.get(C.META_DATA_SYNTHETIC)
    return SiteResult(
        site=site,
        params=params,
        claimed_samples=meta.get(C.META_NUM_SAMPLES),
        metrics=metrics if metrics is not None else {},
        privacy={k: meta.get(key) for k, key in RECEIVED_PRIVACY_KEYS.items()},
        encrypted=meta.get(C.META_ENCRYPTED),
        refused=None if refused is None else str(refused),
        unavailable=None if unavailable is None else str(unavailable),
        data_synthetic=synthetic if isinstance(synthetic, bool) else None,  # anything but a bool: not reported
        control_delta=meta.get(C.META_CONTROL_DELTA),
        ledger_head=meta.get(C.META_LEDGER_HEAD),
        receipt=meta.get(C.META_RECEIPT_SEEN),
    )


def _samples(trained: int, held: int) -> str:
    """'240 samples', or '120 of 240 samples' for a round that trained on its share (rounds_per_epoch)."""
    return f"{held} samples" if trained == held else f"{trained} of {held} samples"
