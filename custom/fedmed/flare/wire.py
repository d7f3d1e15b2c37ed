"""FLModel <-> the round engine's plain types (which meta key carries what: fedmed.site.site_round.as_received)."""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed.job import constants as C
from fedmed.server.parallel import thread_map
from fedmed.server.rounds import SiteResult
from fedmed.site.site_round import as_received


def site_of(result: FLModel) -> str:
    # NVFlare's ModelController sets client_name from the authenticated connection, not from the site's payload.
    return str((result.meta or {}).get("client_name", "?"))


def to_site_result(result: FLModel, verify=None) -> SiteResult:
    """verify(result, site) -> fedmed.flare.signatures.Verified (signature, digest, BLAKE3 of result.params), raising
    ValueError naming why: when given, every update that is not a refusal must carry a valid signature of its site.
    The BLAKE3 was taken of result.params, the very arrays the SiteResult carries, so screening records it instead of
    hashing the update a second time (fedmed.server.passes.update_pass)."""
    meta = result.meta or {}
    signature = digest = params_blake3 = problem = None
    if verify is not None and meta.get(C.META_REFUSED) is None and meta.get(C.META_UNAVAILABLE) is None:
        try:
            verified = verify(result, site_of(result))
            signature, digest, params_blake3 = _hex(verified.signature), _hex(verified.digest), verified.params_blake3
        except ValueError as e:
            problem = str(e)[:300]
    received = as_received(site_of(result), result.params, result.metrics, meta)
    return replace(
        received, signature=signature, signed_digest=digest, params_blake3=params_blake3, authentication=problem
    )


def to_site_results(results: list, verify=None) -> list:
    """[to_site_result(r, verify) for r in results], in order. With signatures each verification is a BLAKE3 pass
    over a 28 MB update (~10 ms of CPU; the blake3 module releases the GIL on large inputs), so they run on the server's
    threads (fedmed.server.parallel): the round waits for the slowest, not the sum."""
    if verify is None:
        return [to_site_result(r) for r in results]
    return thread_map(lambda r: to_site_result(r, verify), results)


def _hex(value):
    return value.hex() if isinstance(value, (bytes, bytearray)) else (None if value is None else str(value))


def global_model(params: Mapping, round_num: int, meta: Mapping, encrypted=None) -> FLModel:
    """The model the server sends and saves: clear params, the meta inference needs (round: counted from 1, as in
    the logs and the record), the encrypted layers."""
    meta = {**meta, "round": round_num}
    if encrypted is not None:
        meta[C.META_ENCRYPTED] = encrypted.to_wire() if hasattr(encrypted, "to_wire") else encrypted
    return FLModel(params_type=ParamsType.FULL, params=dict(params), meta=meta)
