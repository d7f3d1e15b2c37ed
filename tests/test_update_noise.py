"""User-level DP on what leaves a site: clip the whole update, add Gaussian noise (core + the NVFlare filter)."""

import numpy as np
import pytest
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedmed import constants as C
from fedmed.flare.filters import UpdateNoiseFilter
from fedmed.privacy.update_noise import clip_and_noise_update


def _model(rng, shift=0.0):
    return {"w": (rng.normal(size=(50, 40)) + shift).astype(np.float32), "b": np.zeros(40, np.float32) + shift,
            "bn.num_batches_tracked": np.array(7, np.int64)}


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


def test_noise_has_the_configured_scale_under_a_fixed_seed():
    ref = {"w": np.zeros(200_000, np.float32)}
    a = clip_and_noise_update(ref, ref, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(1))
    b = clip_and_noise_update(ref, ref, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(1))
    assert a.noise_std == 1.0 and np.std(a.params["w"]) == pytest.approx(1.0, rel=0.01)
    np.testing.assert_array_equal(a.params["w"], b.params["w"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_norm=0.0, noise_multiplier=1.0), "clip_norm must be > 0"),
    (dict(clip_norm=1.0, noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UpdateNoiseFilter(**kwargs)


def test_nan_update_is_never_released(rng):
    ref = _model(rng)
    upd = {**ref, "w": np.full_like(ref["w"], np.nan)}
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_and_noise_update(upd, ref, 1.0, 1.0, rng)


def test_filter_noises_the_result_and_fails_closed_without_a_reference(rng):
    ref = _model(rng)
    upd = {k: v + (1.0 if v.dtype.kind == "f" else 0) for k, v in ref.items()}
    shareable = FLModelUtils.to_shareable(FLModel(params_type=ParamsType.FULL, params=upd, meta={"num_samples": 5}))
    flt = UpdateNoiseFilter(clip_norm=2.0, noise_multiplier=0.1, seed=3)
    ctx = FLContext()
    with pytest.raises(RuntimeError, match="refusing to release an un-noised update"):
        flt.process(shareable, ctx)
    ctx.set_prop(C.CTX_GLOBAL_PARAMS, ref, private=True, sticky=False)
    out = FLModelUtils.from_shareable(flt.process(shareable, ctx))
    assert out.meta[C.META_UPDATE_CLIP_NORM] == 2.0 and out.meta["num_samples"] == 5
    delta = _delta_norm(out.params, ref)
    noise_norm = 0.1 * 2.0 * np.sqrt(ref["w"].size + ref["b"].size)  # expected norm of the added noise
    assert abs(delta - np.sqrt(4.0 + noise_norm**2)) < 0.1 * noise_norm
