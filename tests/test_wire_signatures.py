"""Signed updates and global models through NVFlare's real wire path (FLModel -> Shareable -> FOBS bytes and back)."""

import numpy as np
import pytest
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.utils import fobs

from conftest import over_the_wire
from fedmed.flare import signatures as wire_sig
from fedmed.flare.filters import UpdateNoiseFilter
from fedmed.job import constants as C
from fedmed.models import hashing
from fedmed.security import signing
from fedmed.security.signing import SignatureError


def _update():
    rng = np.random.default_rng(1)
    return FLModel(
        params_type=ParamsType.FULL,
        params={
            "w": rng.normal(size=(8, 4)).astype(np.float32),
            "b": np.zeros(4, np.float32),
            "n": np.array(3, np.int64),
        },
        metrics={C.META_TRAIN_LOSS: 0.41, C.META_VAL_MEAN_AUROC: np.float32(0.63)},
        meta={
            C.META_NUM_SAMPLES: 120,
            C.META_SITE: "hospital-a",
            C.META_EPSILON: 1.2,
            C.META_DELTA: 1e-5,
            C.META_ENCRYPTED: {"names": ["head.w"], "shapes": [[4, 2]], "chunks": [b"\x07" * 64], "key_id": "k"},
        },
    )


def test_a_signed_update_survives_the_wire_and_verifies(signing_keys):
    model = _update()
    wire_sig.sign_result(model, "job-1", 2, "hospital-a", signing_keys["hospital-a"])
    received = over_the_wire(model)
    sig, digest, params_blake3 = wire_sig.verify_result(
        received, "job-1", 2, "hospital-a", signing_keys["hospital-a"].public
    )
    assert sig == model.meta[C.META_SIGNATURE] and len(sig) == signing.SIGNATURE_BYTES
    assert params_blake3 == hashing.params_blake3(received.params)  # what screening records, not hashed again
    assert signing.verify(digest, sig, signing_keys["hospital-a"].public) is None  # what audit_verify re-checks offline


@pytest.mark.parametrize(
    "tamper, says",
    [
        (lambda m: m.meta.update({C.META_NUM_SAMPLES: 10_000}), "does not verify"),  # weigh more in the aggregate
        (lambda m: m.meta.update({C.META_EPSILON: 0.01}), "does not verify"),  # under-report the privacy spend
        (lambda m: m.params["w"].__setitem__((0, 0), 9.0), "does not verify"),
        (lambda m: m.metrics.update({C.META_VAL_MEAN_AUROC: 0.99}), "does not verify"),
        (lambda m: m.meta[C.META_ENCRYPTED]["chunks"].__setitem__(0, b"\x08" * 64), "does not verify"),
        (lambda m: m.meta.pop(C.META_SIGNATURE), "unsigned"),
    ],
)
def test_an_update_changed_after_signing_is_refused_with_the_reason(signing_keys, tamper, says):
    model = _update()
    wire_sig.sign_result(model, "job-1", 2, "hospital-a", signing_keys["hospital-a"])
    received = over_the_wire(model)
    tamper(received)
    with pytest.raises(SignatureError, match=says):
        wire_sig.verify_result(received, "job-1", 2, "hospital-a", signing_keys["hospital-a"].public)


def test_an_update_replayed_into_another_round_or_job_is_refused(signing_keys):
    model = _update()
    wire_sig.sign_result(model, "job-1", 2, "hospital-a", signing_keys["hospital-a"])
    received = over_the_wire(model)
    for job, rnd in (("job-1", 3), ("job-2", 2)):
        with pytest.raises(SignatureError, match="does not verify"):
            wire_sig.verify_result(received, job, rnd, "hospital-a", signing_keys["hospital-a"].public)


def test_the_global_model_is_signed_by_the_server_and_checked_by_the_site(signing_keys):
    model = FLModel(params_type=ParamsType.FULL, params={"w": np.ones((3, 3), np.float32)}, current_round=4)
    wire_sig.sign_global(model, "job-1", 4, signing_keys["server"])
    received = over_the_wire(model)
    assert wire_sig.verify_global(received, "job-1", 4, signing_keys["server"].public) is None
    received.params["w"][0, 0] = 0.0  # a man in the middle (or a rogue relay) swaps in its own weights
    with pytest.raises(SignatureError, match="global model was altered"):
        wire_sig.verify_global(received, "job-1", 4, signing_keys["server"].public)
    unsigned = over_the_wire(FLModel(params_type=ParamsType.FULL, params={"w": np.ones((3, 3), np.float32)}))
    with pytest.raises(SignatureError, match="unsigned: no signature from server"):
        wire_sig.verify_global(unsigned, "job-1", 4, signing_keys["server"].public)
    forged = _update()  # a hospital cannot sign as the server
    wire_sig.sign_global(forged, "job-1", 4, signing_keys["hospital-a"])
    with pytest.raises(SignatureError, match="not server's installed key"):
        wire_sig.verify_global(over_the_wire(forged), "job-1", 4, signing_keys["server"].public)


def test_update_noise_filter_signs_what_it_releases(signing_keys, tmp_path):
    from fedmed.privacy.ledger import LedgerBinding, PrivacyLedger

    model = _update()
    del model.meta[C.META_ENCRYPTED]  # the filter refuses encrypted payloads (user-level DP or selective HE)
    reference = {k: v.copy() for k, v in model.params.items()}
    model.params = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in model.params.items()}
    wire_sig.sign_result(model, "job-1", 2, "hospital-a", signing_keys["hospital-a"])
    flt = UpdateNoiseFilter(clip_norm=1.0, noise_multiplier=0.1, seed=0)
    ctx = FLContext()
    ctx.set_prop(C.CTX_GLOBAL_PARAMS, reference, private=True, sticky=False)
    binding = LedgerBinding(PrivacyLedger(tmp_path / "ledger.jsonl"), "d" * 64, "job-1", 1e-5, None)
    ctx.set_prop(C.CTX_PRIVACY_LEDGER, {"binding": binding, "round": 2}, private=True, sticky=False)
    with pytest.raises(RuntimeError, match="signature no longer matches"):
        flt.process(FLModelUtils.to_shareable(model), ctx)
    ctx.set_prop(C.CTX_SIGNER, (signing_keys["hospital-a"], "job-1", 2, "hospital-a"), private=True, sticky=False)
    out = flt.process(FLModelUtils.to_shareable(model), ctx)
    received = FLModelUtils.from_shareable(fobs.loads(fobs.dumps(out)))
    assert received.meta[C.META_UPDATE_CLIP_NORM] == 1.0
    assert not np.allclose(received.params["w"], model.params["w"])  # noised after the executor signed
    wire_sig.verify_result(received, "job-1", 2, "hospital-a", signing_keys["hospital-a"].public)


def test_updates_verified_on_the_servers_threads_keep_their_order_and_each_verdict(signing_keys):
    from fedmed.flare.wire import to_site_result, to_site_results
    from fedmed.models.hashing import params_blake3

    public = signing_keys["hospital-a"].public

    def verify(result, site):
        return wire_sig.verify_result(result, "job-1", 2, "hospital-a", public)

    results = []
    for i in range(5):
        model = _update()
        model.params["w"] = model.params["w"] + i
        wire_sig.sign_result(model, "job-1", 2, "hospital-a", signing_keys["hospital-a"])
        received = over_the_wire(model)
        received.meta["client_name"] = f"site-{i}"
        if i == 3:
            received.params["w"][0, 0] += 1.0  # changed after signing: refused, the others not
        results.append(received)
    together = to_site_results(results, verify)
    one_by_one = [to_site_result(r, verify) for r in results]
    assert [r.site for r in together] == [f"site-{i}" for i in range(5)]
    assert [(r.signature, r.signed_digest, r.authentication) for r in together] == [
        (r.signature, r.signed_digest, r.authentication) for r in one_by_one
    ]
    assert [r.authentication is None for r in together] == [True, True, True, False, True]
    assert [r.params_blake3 for r in together] == [
        None if i == 3 else params_blake3(results[i].params) for i in range(5)
    ]
    assert "does not verify" in together[3].authentication
    assert [r.signature for r in to_site_results(results)] == [None] * 5  # no verifier: nothing checked
