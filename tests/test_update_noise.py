"""User-level DP on what leaves a site: clip the whole update, add Gaussian noise (core + the NVFlare filter)."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedmed.flare.filters import UpdateNoiseFilter
from fedmed.job import constants as C
from fedmed.privacy.ledger import LedgerBinding, PrivacyLedger
from fedmed.privacy.update_noise import clip_and_noise_update


def _model(rng, shift=0.0):
    return {
        "w": (rng.normal(size=(50, 40)) + shift).astype(np.float32),
        "b": np.zeros(40, np.float32) + shift,
        "bn.num_batches_tracked": np.array(7, np.int64),
    }


def _delta_norm(a, b):
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in ("w", "b"))))


def test_large_update_is_clipped_to_the_bound_and_inputs_are_untouched(rng):
    ref = _model(rng)
    upd = {k: v + (3.0 if v.dtype.kind == "f" else 0) for k, v in ref.items()}
    before = {k: v.copy() for k, v in upd.items()}
    out = clip_and_noise_update(upd, ref, clip_norm=1.0, noise_multiplier=0.0, rng=rng)
    assert out.norm == pytest.approx(_delta_norm(upd, ref)) and out.scale < 1
    assert _delta_norm(out.params, ref) == pytest.approx(1.0, rel=1e-4)
    assert out.params["bn.num_batches_tracked"] == 7 and out.params["w"].dtype == np.float32
    assert all(np.array_equal(upd[k], before[k]) for k in upd)  # no mutation


def test_small_update_is_not_scaled(rng):
    ref = _model(rng)
    upd = {k: v + (1e-4 if v.dtype.kind == "f" else 0) for k, v in ref.items()}
    out = clip_and_noise_update(upd, ref, clip_norm=10.0, noise_multiplier=0.0, rng=rng)
    assert out.scale == 1.0
    np.testing.assert_allclose(out.params["w"], upd["w"], atol=1e-6)


@pytest.mark.parametrize("relation, std", [("add_remove", 1.0), ("replace", 2.0)])
def test_noise_scale_follows_the_stated_neighbouring_relation(relation, std):
    # add/remove one site moves the clipped update by at most C; replacing the site's data by up to 2C.
    ref = {"w": np.zeros(200_000, np.float32)}
    a = clip_and_noise_update(
        ref, ref, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(1), relation=relation
    )
    b = clip_and_noise_update(
        ref, ref, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(1), relation=relation
    )
    assert a.noise_std == std and a.sensitivity == std / 0.5
    assert np.std(a.params["w"]) == pytest.approx(std, rel=0.01)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])


def test_the_default_relation_is_replace_one():
    ref = {"w": np.zeros(10, np.float32)}
    assert clip_and_noise_update(ref, ref, 1.0, 1.0, np.random.default_rng(0)).sensitivity == 2.0
    assert UpdateNoiseFilter(clip_norm=1.0, noise_multiplier=1.0).noise_std == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_norm=0.0, noise_multiplier=1.0), "clip_norm must be > 0"),
        (dict(clip_norm=1.0, noise_multiplier=-1.0), "noise_multiplier must be > 0"),
        (dict(clip_norm=1.0, noise_multiplier=0.0), "protects nothing"),
        (dict(clip_norm=1.0, noise_multiplier=1.0, relation="swap"), "relation must be one of"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UpdateNoiseFilter(**kwargs)


def test_nan_update_is_never_released(rng):
    ref = _model(rng)
    upd = {**ref, "w": np.full_like(ref["w"], np.nan)}
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_and_noise_update(upd, ref, 1.0, 1.0, rng)


def _binding(tmp_path, ceiling=None):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    return LedgerBinding(ledger, "d" * 64, "job-1", 1e-5, ceiling)


def _ctx(reference=None, binding=None, round_num=0):
    ctx = FLContext()
    if reference is not None:
        ctx.set_prop(C.CTX_GLOBAL_PARAMS, reference, private=True, sticky=False)
    if binding is not None:
        ctx.set_prop(C.CTX_PRIVACY_LEDGER, {"binding": binding, "round": round_num}, private=True, sticky=False)
    return ctx


def _refusal(shareable):
    return FLModelUtils.from_shareable(shareable).meta.get(C.META_REFUSED)


def test_filter_noises_the_result_charges_the_ledger_and_fails_closed(rng, tmp_path):
    ref = _model(rng)
    upd = {k: v + (1.0 if v.dtype.kind == "f" else 0) for k, v in ref.items()}
    shareable = FLModelUtils.to_shareable(FLModel(params_type=ParamsType.FULL, params=upd, meta={"num_samples": 5}))
    flt = UpdateNoiseFilter(clip_norm=2.0, noise_multiplier=0.1, relation="add_remove", seed=3)
    binding = _binding(tmp_path)
    with pytest.raises(RuntimeError, match="refusing to release an un-noised update"):
        flt.process(shareable, _ctx(binding=binding))
    # no ledger: nothing leaves, the server is told why
    assert "privacy ledger is not open" in _refusal(flt.process(shareable, _ctx(reference=ref)))
    assert binding.ledger.entries() == []
    out = FLModelUtils.from_shareable(flt.process(shareable, _ctx(ref, binding, round_num=4)))
    assert out.meta[C.META_UPDATE_CLIP_NORM] == 2.0 and out.meta["num_samples"] == 5
    delta = _delta_norm(out.params, ref)
    noise_norm = 0.1 * 2.0 * np.sqrt(ref["w"].size + ref["b"].size)  # expected norm of the added noise
    assert abs(delta - np.sqrt(4.0 + noise_norm**2)) < 0.1 * noise_norm
    [entry] = binding.ledger.entries()
    # example level: any change to the site's data moves the clipped update by <= 2C, so sigma_eff = std / 2C
    assert (entry.round, entry.mechanism, entry.history) == (4, "user_level", ((0.1 * 2.0 / 4.0, 1.0, 1),))
    assert entry.details["relation"] == "add_remove" and entry.details["sensitivity"] == 2.0
    assert out.meta[C.META_LIFETIME_EPSILON] == entry.epsilon_after > 0


def test_filter_refuses_a_round_past_the_lifetime_ceiling(rng, tmp_path):
    ref = _model(rng)
    upd = {k: v + (1.0 if v.dtype.kind == "f" else 0) for k, v in ref.items()}
    flt = UpdateNoiseFilter(clip_norm=1.0, noise_multiplier=2.0)
    binding = _binding(tmp_path, ceiling=3.0)
    released = 0
    for r in range(20):
        shareable = FLModelUtils.to_shareable(FLModel(params_type=ParamsType.FULL, params=upd, meta={}))
        reason = _refusal(flt.process(shareable, _ctx(ref, binding, r)))
        if reason:
            break
        released += 1
    assert 0 < released < 20 and "over the site's lifetime ceiling 3.0" in reason
    assert len(binding.ledger.entries()) == released and binding.lifetime_epsilon() <= 3.0


def test_weight_diff_is_noised_as_the_delta_itself(rng, tmp_path):
    diff = {"w": np.full((50, 40), 1.0, np.float32), "b": np.zeros(40, np.float32)}
    shareable = FLModelUtils.to_shareable(FLModel(params_type=ParamsType.DIFF, params=diff, meta={}))
    flt = UpdateNoiseFilter(clip_norm=1.0, noise_multiplier=1e-6, seed=0)
    out = FLModelUtils.from_shareable(flt.process(shareable, _ctx(binding=_binding(tmp_path))))
    norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in out.params.values())))
    assert norm == pytest.approx(1.0, rel=1e-3)  # clipped from sqrt(2000) to C


def test_payloads_the_filter_cannot_noise_are_refused_with_the_reason(rng, tmp_path):
    ref = _model(rng)
    flt = UpdateNoiseFilter(clip_norm=1.0, noise_multiplier=1.0)
    binding = _binding(tmp_path)
    encrypted = FLModelUtils.to_shareable(
        FLModel(params_type=ParamsType.FULL, params=ref, meta={C.META_ENCRYPTED: {"chunks": []}})
    )
    assert "CKKS-encrypted layers" in _refusal(flt.process(encrypted, _ctx(ref, binding)))
    other = DXO(DataKind.COLLECTION, data={"w": ref["w"]}).to_shareable()
    assert "payload kind 'COLLECTION' cannot be clipped" in _refusal(flt.process(other, _ctx(ref, binding)))
    metrics = FLModelUtils.to_shareable(FLModel(metrics={"saved": 1.0}))
    assert flt.process(metrics, _ctx(ref, binding)) is metrics  # nothing of the model: passes as it is
    assert binding.ledger.entries() == []


def test_batchnorm_statistics_are_not_released_but_the_global_models_sent_back(rng, tmp_path):
    # Noised, a running variance goes negative (the server rejects it); released as is, it would leak the site's
    # data outside the guarantee. The filter sends the global model's statistics instead.
    ref = {
        "w": rng.normal(size=16).astype(np.float32),
        "bn.running_mean": np.zeros(4, np.float32),
        "bn.running_var": np.ones(4, np.float32),
        "bn.num_batches_tracked": np.array(3, np.int64),
    }
    upd = {
        **ref,
        "w": ref["w"] + 1.0,
        "bn.running_var": np.full(4, 2.5, np.float32),
        "bn.running_mean": np.full(4, 0.7, np.float32),
        "bn.num_batches_tracked": np.array(9, np.int64),
    }
    shareable = FLModelUtils.to_shareable(FLModel(params_type=ParamsType.FULL, params=upd, meta={"num_samples": 5}))
    flt = UpdateNoiseFilter(clip_norm=1.0, noise_multiplier=5.0, seed=3)
    out = FLModelUtils.from_shareable(flt.process(shareable, _ctx(ref, _binding(tmp_path), round_num=0)))
    for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        np.testing.assert_array_equal(out.params[key], ref[key])
    assert not np.allclose(out.params["w"], upd["w"])  # the weights are noised


def test_the_filter_re_reports_the_ledger_head_with_its_charge_and_signs_it(rng, tmp_path, signing_keys):
    """fedmed.server.anchors: the head the site's update vouches for includes the filter's own charge, inside the signature
    the filter makes for what leaves."""
    from fedmed.flare.signatures import sign_result, verify_result
    from fedmed.job.tasks import CHEST_XRAY14
    from fedmed.security import signing
    from fedmed.site.site_round import Site, vouch

    ref = _model(rng)
    binding = _binding(tmp_path)
    binding.charge(0, "user_level", [(1.0, 1.0, 1)])  # round 1's charge, reported to the server (count 1)
    meta = {"num_samples": 5}
    vouch(Site("hospital-a", CHEST_XRAY14, None, None, ledger=binding), 1, meta)  # the site round, before the filter
    assert meta[C.META_LEDGER_HEAD]["entries"] == 1
    model = FLModel(params_type=ParamsType.FULL, params={k: v + 1.0 for k, v in ref.items()}, meta=meta)
    keys = signing_keys["hospital-a"]
    sign_result(model, "job-1", 1, "hospital-a", keys)
    ctx = _ctx(ref, binding, round_num=1)
    ctx.set_prop(C.CTX_SIGNER, (keys, "job-1", 1, "hospital-a"), private=True, sticky=False)
    flt = UpdateNoiseFilter(clip_norm=2.0, noise_multiplier=0.1, seed=3)
    out = FLModelUtils.from_shareable(flt.process(FLModelUtils.to_shareable(model), ctx))
    head = out.meta[C.META_LEDGER_HEAD]
    assert head["entries"] == 2 and head["head"] == binding.ledger.head()  # with this round's charge
    assert head["at_previous"][0] == 1 and head["lifetime_epsilon"] == out.meta[C.META_LIFETIME_EPSILON]
    verify_result(out, "job-1", 1, "hospital-a", keys.public)  # signed as it leaves
    out.meta[C.META_LEDGER_HEAD] = {**head, "entries": 1}
    with pytest.raises(signing.SignatureError):
        verify_result(out, "job-1", 1, "hospital-a", keys.public)
