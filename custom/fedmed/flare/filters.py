"""NVFlare task-result filter a hospital puts in its own privacy scope: user-level DP on what leaves the site."""

from __future__ import annotations

from typing import Optional

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedmed import constants as C
from fedmed.flare.signatures import sign_result
from fedmed.privacy.update_noise import clip_and_noise_update


class UpdateNoiseFilter(Filter):
    def __init__(self, clip_norm: float, noise_multiplier: float, seed: Optional[int] = None):
        """Clip the whole update (its distance to the global model the site received) to clip_norm and add Gaussian
        noise of std noise_multiplier x clip_norm, before the result leaves the hospital.

        Put it in the site's local/privacy.json, in the scope's "task_result_filters":
            {"path": "fedmed.flare.filters.UpdateNoiseFilter", "args": {"clip_norm": 5.0, "noise_multiplier": 0.5}}
        It fails closed: without the global model to measure against it refuses to release the update. With
        selective HE on, only the clear part is covered (the encrypted layers are already unreadable to the server).

        Args:
            clip_norm: L2 bound C on the update's delta (> 0).
            noise_multiplier: sigma (>= 0); noise std is sigma x C.
            seed: noise seed, for rehearsals only (None = fresh OS entropy every round).
        """
        super().__init__()
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self._rng = np.random.default_rng(seed)
        self._warned_he = False

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        dxo = from_shareable(shareable)
        if dxo.data_kind not in (DataKind.WEIGHTS,) or not dxo.data:
            return shareable  # metrics-only replies (a refused round, the final-model acknowledgement)
        reference = fl_ctx.get_prop(C.CTX_GLOBAL_PARAMS)
        if reference is None:
            raise RuntimeError("UpdateNoiseFilter: the global model this update started from is unknown; refusing "
                               "to release an un-noised update (is the site running fedmed's FedMedTrainer?)")
        clear_reference = {k: reference[k] for k in dxo.data if k in reference}
        noised = clip_and_noise_update(dxo.data, clear_reference, self.clip_norm, self.noise_multiplier, self._rng)
        if C.META_ENCRYPTED in dxo.meta and not self._warned_he:
            self.log_warning(fl_ctx, "UpdateNoiseFilter covers the clear part only; the encrypted layers pass as they are")
            self._warned_he = True
        dxo.data = noised.params
        dxo.set_meta_prop(C.META_UPDATE_CLIP_NORM, self.clip_norm)
        dxo.set_meta_prop(C.META_UPDATE_NOISE_MULTIPLIER, self.noise_multiplier)
        self.log_info(fl_ctx, f"user-level DP: update norm {noised.norm:.4g} clipped x{noised.scale:.3f} to "
                              f"{self.clip_norm}, Gaussian noise std {noised.noise_std:.3g}")
        out = dxo.update_shareable(shareable)
        if C.META_SIGNATURE in dxo.meta:  # the executor signed the un-noised update: sign what leaves instead
            signer = fl_ctx.get_prop(C.CTX_SIGNER)
            if signer is None:
                raise RuntimeError("UpdateNoiseFilter: the update is signed but the signing key is not in the context; "
                                   "refusing to release an update whose signature no longer matches")
            keys, job_id, round_num, site = signer
            model = FLModelUtils.from_shareable(out)
            sign_result(model, job_id, round_num, site, keys)
            dxo.set_meta_prop(C.META_SIGNATURE, model.meta[C.META_SIGNATURE])
            out = dxo.update_shareable(shareable)
        return out
