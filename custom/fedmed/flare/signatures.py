"""Signatures on what crosses the wire, as FLModels carry it (fedmed.security.signing does the cryptography).

Both sides compute the same digest from the same FLModel fields, so the site and the server never exchange the
digest itself:
    update:       the clear params, meta[he_encrypted] (CKKS chunks), meta[num_samples], the metrics and the
                  privacy spend in meta (DP-SGD epsilon/delta/budget/sigma, user-level DP clip/sigma, lifetime
                  epsilon), the site's ledger head and the audit receipt it last saw (fedmed.server.anchors)
    global model: the clear params and meta[he_encrypted]
The job id and round come from each side's own context, never from the message: an update replayed into another
round or job fails to verify.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple, Optional

from nvflare.app_common.abstract.fl_model import FLModel

from fedmed.job import constants as C
from fedmed.security import signing
from fedmed.site.site_round import SIGNED_PRIVACY_KEYS, update_digest
from fedmed.store import receipts

PRIVACY_KEYS = SIGNED_PRIVACY_KEYS


def result_digest(model: FLModel, job_id: str, round_num: int, site: str) -> bytes:
    return update_digest(model.params, model.metrics, model.meta, job_id, round_num, site)


def sign_result(model: FLModel, job_id: str, round_num: int, site: str, keys: signing.SiteKeys) -> None:
    """Site side: sign the update in place (meta[fedmed_signature]); call it after the last change to the model."""
    model.meta = dict(model.meta or {})
    model.meta.pop(C.META_SIGNATURE, None)
    model.meta[C.META_SIGNATURE] = signing.sign(result_digest(model, job_id, round_num, site), keys)


class Verified(NamedTuple):
    """What the server keeps of a verified update: the signature and the digest it covers (UpdateRecord.signature /
    signed_digest, as hex), and the BLAKE3 of the clear parameters that digest was built from
    (fedmed.models.hashing.params_blake3 of model.params): screening records it instead of hashing the update again."""

    signature: bytes
    digest: bytes
    params_blake3: str


def verify_result(model: FLModel, job_id: str, round_num: int, site: str, public: signing.PublicKeys) -> Verified:
    """Server side: raises fedmed.security.signing.SignatureError (a ValueError) naming the reason, else returns what
    to keep (Verified)."""
    sig = (model.meta or {}).get(C.META_SIGNATURE)
    hashed = signing.hash_params(model.params or {})  # one pass over the update, for the signature and the record
    digest = update_digest(hashed, model.metrics, model.meta, job_id, round_num, site)
    signing.verify(digest, sig, public)
    return Verified(sig, digest, hashed.blake3)


def global_digest(model: FLModel, job_id: str, round_num: int) -> bytes:
    return signing.global_model_digest(job_id, round_num, model.params or {}, (model.meta or {}).get(C.META_ENCRYPTED))


def sign_global(model: FLModel, job_id: str, round_num: int, keys: signing.SiteKeys) -> None:
    """Server side: sign the global model in place (meta[fedmed_global_signature]) just before it is sent."""
    model.meta = dict(model.meta or {})
    model.meta[C.META_GLOBAL_SIGNATURE] = signing.sign_global_model(global_digest(model, job_id, round_num), keys)


def audit_receipt(db, run_uid: str, round_num: int, keys: Optional[signing.SiteKeys]) -> Optional[dict]:
    """Server side: the audit chain's head this round's record left, signed, for the next global model to carry
    (meta[fedmed_audit_receipt]). None when unsigned, or when the round is journaled (not in the chain yet)."""
    head = db.chain_head() if keys is not None else None
    return None if head is None else asdict(receipts.make_receipt(run_uid, round_num, head, keys))


def keep_receipt(model: FLModel, server: signing.PublicKeys, fl_ctx) -> None:
    """Site side, after verify_global: keep the receipt the global model carries in the kit's local/."""
    if (model.meta or {}).get(C.META_AUDIT_RECEIPT) is not None:
        store_receipt(model, server, Path(fl_ctx.get_engine().get_workspace().get_site_config_dir()))


def last_receipt(fl_ctx) -> Optional[dict]:
    """Site side, at job start: the newest receipt in the kit's local/audit_receipts.jsonl (an earlier job's), which
    the site echoes in its first update until the server sends this job's."""
    engine = fl_ctx.get_engine()
    if engine is None:  # a context with no engine (a bare executor harness) has no kit to read
        return None
    return receipts.last_receipt(Path(engine.get_workspace().get_site_config_dir()) / receipts.RECEIPTS_FILE)


def store_receipt(model: FLModel, server: signing.PublicKeys, local_dir: Path) -> None:
    """Append the global model's receipt to local_dir/audit_receipts.jsonl, only if the server signed it (raises
    SignatureError otherwise): the hospital's own copy of the record's head."""
    raw = (model.meta or {}).get(C.META_AUDIT_RECEIPT)
    if raw is None:
        return
    try:
        receipt = receipts.Receipt(**raw)
    except TypeError as e:
        raise signing.SignatureError(f"malformed audit receipt: {e}") from None
    receipts.append_receipt(Path(local_dir) / receipts.RECEIPTS_FILE, receipt, server)


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
