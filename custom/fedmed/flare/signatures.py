"""Signatures on what crosses the wire, as FLModels carry it (fedmed.signing does the cryptography).

Both sides compute the same digest from the same FLModel fields, so the site and the server never exchange the
digest itself:
    update:       the clear params, meta[he_encrypted] (CKKS chunks), meta[num_samples], the metrics and the
                  privacy spend in meta (DP-SGD epsilon/delta/budget/sigma, user-level DP clip/sigma)
    global model: the clear params and meta[he_encrypted]
The job id and round come from each side's own context, never from the message: an update replayed into another
round or job fails to verify.
"""

from __future__ import annotations

from typing import Optional

from nvflare.app_common.abstract.fl_model import FLModel

from fedmed import constants as C
from fedmed import signing
from fedmed.site_round import SIGNED_PRIVACY_KEYS, update_digest

PRIVACY_KEYS = SIGNED_PRIVACY_KEYS


def result_digest(model: FLModel, job_id: str, round_num: int, site: str) -> bytes:
    return update_digest(model.params, model.metrics, model.meta, job_id, round_num, site)


def sign_result(model: FLModel, job_id: str, round_num: int, site: str, keys: signing.SiteKeys) -> None:
    """Site side: sign the update in place (meta[fedmed_signature]); call it after the last change to the model."""
    model.meta = dict(model.meta or {})
    model.meta.pop(C.META_SIGNATURE, None)
    model.meta[C.META_SIGNATURE] = signing.sign(result_digest(model, job_id, round_num, site), keys)


def verify_result(
    model: FLModel, job_id: str, round_num: int, site: str, public: signing.PublicKeys
) -> tuple[bytes, bytes]:
    """Server side: raises fedmed.signing.SignatureError (a ValueError) naming the reason, else returns (signature,
    digest) to store with the update (UpdateRecord.signature / signed_digest, as hex)."""
    sig = (model.meta or {}).get(C.META_SIGNATURE)
    digest = result_digest(model, job_id, round_num, site)
    signing.verify(digest, sig, public)
    return sig, digest


def global_digest(model: FLModel, job_id: str, round_num: int) -> bytes:
    return signing.global_model_digest(job_id, round_num, model.params or {}, (model.meta or {}).get(C.META_ENCRYPTED))


def sign_global(model: FLModel, job_id: str, round_num: int, keys: signing.SiteKeys) -> None:
    """Server side: sign the global model in place (meta[fedmed_global_signature]) just before it is sent."""
    model.meta = dict(model.meta or {})
    model.meta[C.META_GLOBAL_SIGNATURE] = signing.sign_global_model(global_digest(model, job_id, round_num), keys)


def verify_global(model: FLModel, job_id: str, round_num: int, server: signing.PublicKeys) -> None:
    """Site side: raises SignatureError unless the server signed exactly this global model for this job and round."""
    signing.verify_global_model(
        global_digest(model, job_id, round_num), (model.meta or {}).get(C.META_GLOBAL_SIGNATURE), server
    )


def load_keys(local_dir, need_server_key: bool = True) -> tuple[signing.SiteKeys, Optional[signing.PublicKeys]]:
    """A site's own keys and the server's installed public key, from its kit's local/ (raises naming what is missing)."""
    from pathlib import Path

    keys = signing.load_site_keys(Path(local_dir))
    server = signing.load_public_keys(Path(local_dir) / signing.SERVER_KEY_FILE) if need_server_key else None
    return keys, server
