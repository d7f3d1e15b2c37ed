"""NVFlare task-result filter a hospital puts in its own privacy scope: user-level DP on what leaves the site."""

from __future__ import annotations

from typing import Optional

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedmed.flare.signatures import sign_result
from fedmed.job import constants as C
from fedmed.privacy.accounting import BudgetExceeded
from fedmed.privacy.ledger import LedgerError, LedgerHead, user_level_example_history
from fedmed.privacy.update_noise import RELATIONS, clip_and_noise_update, sensitivity
from fedmed.server.aggregation import is_statistic


class UpdateNoiseFilter(Filter):
    def __init__(
        self, clip_norm: float, noise_multiplier: float, relation: str = "replace", seed: Optional[int] = None
    ):
        """Clip the whole update (its distance to the global model the site received) to clip_norm and add Gaussian
        noise of std noise_multiplier x sensitivity, before the result leaves the hospital; each round is charged to
        the site's lifetime privacy ledger first (fedmed.privacy.ledger), and refused if it would pass the ceiling.

        Put it in the site's local/privacy.json, in the scope's "task_result_filters":
            {"path": "fedmed.flare.filters.UpdateNoiseFilter", "args": {"clip_norm": 5.0, "noise_multiplier": 0.5}}
        It fails closed: without the global model to measure against, or without the site's ledger, it refuses to
        release the update. Payloads it cannot noise are refused, with the reason sent to the server: CKKS-encrypted
        layers (the encrypted head would leave un-clipped and un-noised, and the aggregate is decrypted by every
        hospital) and any data kind other than full weights or weight differences.

        Args:
            clip_norm: L2 bound C on the update's delta (> 0).
            noise_multiplier: sigma (> 0); noise std is sigma x sensitivity.
            relation: neighbouring relation the guarantee is stated for: "replace" (default; the site's data replaced
                by any other; sensitivity 2C) or "add_remove" (the site present or absent; sensitivity C). See
                fedmed.privacy.update_noise.
            seed: noise seed, for tests only (None = fresh OS entropy, numpy's PCG64 seeded by the OS). It is an
                argument of the site's own privacy.json, which no job can change.
        """
        super().__init__()
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if not noise_multiplier > 0:
            raise ValueError(
                f"noise_multiplier must be > 0 (a filter without noise protects nothing), got {noise_multiplier}"
            )
        if relation not in RELATIONS:
            raise ValueError(f"relation must be one of {sorted(RELATIONS)}, got {relation!r}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.relation = relation
        self._rng = np.random.default_rng(seed)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * sensitivity(self.clip_norm, self.relation)

    def example_history(self) -> list:
        """This filter's round as an example-level RDP entry, for the site's lifetime ledger."""
        return [user_level_example_history(self.clip_norm, self.noise_std)]

    def _refuse(self, shareable: Shareable, fl_ctx: FLContext, reason: str) -> Shareable:
        self.log_error(fl_ctx, f"UpdateNoiseFilter: not releasing this update: {reason}")
        site = fl_ctx.get_identity_name()
        return FLModelUtils.to_shareable(
            FLModel(metrics={}, meta={C.META_REFUSED: f"user-level DP filter: {reason}", C.META_SITE: site})
        )

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind == DataKind.METRICS:
            return shareable  # metrics-only replies (a refused round, the final-model acknowledgement)
        problem = _why_not_noisable(dxo)
        if problem is not None:
            return self._refuse(shareable, fl_ctx, problem)
        reference = _reference_of(dxo, fl_ctx)
        release = fl_ctx.get_prop(C.CTX_PRIVACY_LEDGER)
        if release is None:
            return self._refuse(
                shareable,
                fl_ctx,
                "the site's privacy ledger is not open (the trainer did not set it), so this round cannot be accounted",
            )
        noised = clip_and_noise_update(
            dxo.data, reference, self.clip_norm, self.noise_multiplier, self._rng, self.relation
        )
        try:  # charged (fsynced) before anything leaves; the check refuses a round past the lifetime ceiling
            entry = release["binding"].charge(
                release["round"],
                "user_level",
                self.example_history(),
                details={
                    "clip_norm": self.clip_norm,
                    "noise_multiplier": self.noise_multiplier,
                    "relation": self.relation,
                    "sensitivity": noised.sensitivity,
                    "noise_std": noised.noise_std,
                },
            )
        except (BudgetExceeded, LedgerError) as e:
            return self._refuse(shareable, fl_ctx, str(e))
        # BatchNorm running statistics are not released: noised they stop being valid statistics (a variance
        # below 0, which the server rejects), and un-noised they would leak the site's data outside the
        # guarantee. The site sends the global model's statistics back instead (post-processing: no privacy cost).
        dxo.data = {
            k: (np.asarray(reference[k]) if is_statistic(k) and k in reference else v) for k, v in noised.params.items()
        }
        dxo.set_meta_prop(C.META_UPDATE_CLIP_NORM, self.clip_norm)
        dxo.set_meta_prop(C.META_UPDATE_NOISE_MULTIPLIER, self.noise_multiplier)
        dxo.set_meta_prop(C.META_LIFETIME_EPSILON, entry.epsilon_after)
        # the head the update vouches for (fedmed.server.anchors), now with this charge
        if C.META_LEDGER_HEAD in dxo.meta:
            at = LedgerHead.from_wire(dxo.meta[C.META_LEDGER_HEAD]).at_previous
            dxo.set_meta_prop(C.META_LEDGER_HEAD, release["binding"].head_report(at[0] if at else None).to_wire())
        self.log_info(
            fl_ctx,
            f"user-level DP ({self.relation}): update norm {noised.norm:.4g} clipped "
            f"x{noised.scale:.3f} to {self.clip_norm}, Gaussian noise std {noised.noise_std:.3g}; "
            f"dataset lifetime epsilon now {entry.epsilon_after:.3f}",
        )
        return _signed_as_released(dxo, shareable, fl_ctx)


def _why_not_noisable(dxo) -> Optional[str]:
    """Why this filter cannot clip and noise the payload, or None when it can."""
    if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
        kind = getattr(dxo.data_kind, "value", dxo.data_kind)
        return f"payload kind {kind!r} cannot be clipped and noised (only WEIGHTS and WEIGHT_DIFF)"
    if C.META_ENCRYPTED in (dxo.meta or {}):
        return (
            "the update carries CKKS-encrypted layers, which this filter "
            "cannot clip or noise; use selective HE or user-level DP, not both"
        )
    if not dxo.data:
        return "the update carries no parameters"
    return None


def _reference_of(dxo, fl_ctx: FLContext) -> dict:
    """The parameters the update moved from: zeros for a delta, else the global model the trainer started from."""
    if dxo.data_kind == DataKind.WEIGHT_DIFF:
        return {k: np.zeros_like(np.asarray(v)) for k, v in dxo.data.items()}  # the data is the delta
    reference = fl_ctx.get_prop(C.CTX_GLOBAL_PARAMS)
    if reference is None:
        raise RuntimeError(
            "UpdateNoiseFilter: the global model this update started from is unknown; "
            "refusing to release an un-noised update (is the site running fedmed's "
            "FedMedTrainer?)"
        )
    return {k: reference[k] for k in dxo.data if k in reference}


def _signed_as_released(dxo, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
    """The shareable with the noised update, re-signed when the executor had signed the un-noised one."""
    out = dxo.update_shareable(shareable)
    if C.META_SIGNATURE not in dxo.meta:
        return out
    signer = fl_ctx.get_prop(C.CTX_SIGNER)
    if signer is None:
        raise RuntimeError(
            "UpdateNoiseFilter: the update is signed but the signing key is not in the context; "
            "refusing to release an update whose signature no longer matches"
        )
    keys, job_id, round_num, site = signer
    model = FLModelUtils.from_shareable(out)
    sign_result(model, job_id, round_num, site, keys)
    dxo.set_meta_prop(C.META_SIGNATURE, model.meta[C.META_SIGNATURE])
    return dxo.update_shareable(shareable)
