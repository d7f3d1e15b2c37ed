"""FLModel <-> the round engine's plain types: the one place that knows which meta key carries what."""

from __future__ import annotations

from typing import Mapping

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed import constants as C
from fedmed.rounds import SiteResult

PRIVACY_KEYS = {
    "epsilon": C.META_EPSILON,
    "delta": C.META_DELTA,
    "epsilon_budget": C.META_EPSILON_BUDGET,
    "noise_multiplier": C.META_NOISE_MULTIPLIER,
}


def site_of(result: FLModel) -> str:
    # NVFlare's ModelController sets client_name from the authenticated connection, not from the site's payload.
    return str((result.meta or {}).get("client_name", "?"))


def to_site_result(result: FLModel, verify=None) -> SiteResult:
    """verify(result, site) -> (signature, digest), raising ValueError naming why (fedmed.flare.signatures): when
    given, every update that is not a refusal must carry a valid signature of its site."""
    meta = result.meta or {}
    refused = meta.get(C.META_REFUSED)
    synthetic = meta.get(C.META_DATA_SYNTHETIC)
    signature = digest = problem = None
    if verify is not None and refused is None and meta.get(C.META_UNAVAILABLE) is None:
        try:
            sig, dig = verify(result, site_of(result))
            signature, digest = _hex(sig), _hex(dig)
        except ValueError as e:
            problem = str(e)[:300]
    return SiteResult(
        site=site_of(result),
        params=result.params,
        claimed_samples=meta.get(C.META_NUM_SAMPLES),
        metrics=result.metrics if result.metrics is not None else {},
        privacy={k: meta.get(key) for k, key in PRIVACY_KEYS.items()},
        encrypted=meta.get(C.META_ENCRYPTED),
        refused=None if refused is None else str(refused),
        unavailable=None if meta.get(C.META_UNAVAILABLE) is None else str(meta.get(C.META_UNAVAILABLE)),
        signature=signature,
        signed_digest=digest,
        authentication=problem,
        data_synthetic=synthetic if isinstance(synthetic, bool) else None,  # anything but a bool: not reported
    )


def _hex(value):
    return value.hex() if isinstance(value, (bytes, bytearray)) else (None if value is None else str(value))


def global_model(params: Mapping, round_num: int, meta: Mapping, encrypted=None) -> FLModel:
    """The model the server sends and saves: clear params, the meta inference needs (round: counted from 1, as in
    the logs and the record), the encrypted layers."""
    meta = {**meta, "round": round_num}
    if encrypted is not None:
        meta[C.META_ENCRYPTED] = encrypted.to_wire() if hasattr(encrypted, "to_wire") else encrypted
    return FLModel(params_type=ParamsType.FULL, params=dict(params), meta=meta)
