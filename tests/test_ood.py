"""The out-of-distribution guard on tiny inputs: statistics and threshold from calibration features, scores that
separate shifted features, malformed statistics refused, and the flag carried through infer's outputs."""

import numpy as np
import pytest
import torch

from fedmed.inference.ood import OodStatistics, fit_ood


def _features(rng, n, shift=0.0, d=40):
    basis = np.linspace(1.0, 0.1, d)  # anisotropic, as real features are
    return rng.normal(size=(n, d)) * basis + shift


def test_scores_separate_shifted_features_and_the_threshold_holds_on_fresh_in_distribution(rng):
    stats = fit_ood(_features(rng, 200), "test", quantile=0.95, n_components=8)
    fresh, shifted = stats.score(_features(rng, 400)), stats.score(_features(rng, 400, shift=1.0))
    assert np.mean(fresh > stats.threshold) < 0.15  # about 5% by construction; out-of-fold, so not far below
    assert np.mean(shifted > stats.threshold) > 0.9
    assert stats.calibration == {"images": 200, "data": "test", "quantile": 0.95, "folds": 5, "components": 8}


def test_statistics_round_trip_through_the_model_file_meta(rng):
    stats = fit_ood(_features(rng, 30), "test")
    back = OodStatistics.from_meta(stats.to_meta())
    x = _features(rng, 5)
    np.testing.assert_allclose(back.score(x), stats.score(x), rtol=1e-4)  # stored as float32
    assert back.threshold == pytest.approx(stats.threshold)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("precision"), "incomplete or malformed"),
        (lambda m: m.update(components=torch.zeros(3, 7)), "inconsistent shapes"),
        (lambda m: m.update(residual=0.0), "residual > 0"),
        (lambda m: m.update(threshold=float("nan")), "must be finite"),
    ],
)
def test_malformed_statistics_are_refused(rng, change, message):
    meta = fit_ood(_features(rng, 12), "test").to_meta()
    change(meta)
    with pytest.raises(ValueError, match=message):
        OodStatistics.from_meta(meta, "m.pt")


@pytest.mark.parametrize(
    "n, folds, message", [(3, None, "at least 4 calibration images"), (10, 6, "folds must be in \\[2, 5\\]")]
)
def test_too_little_calibration_data_is_refused(rng, n, folds, message):
    with pytest.raises(ValueError, match=message):
        fit_ood(_features(rng, n), "test", folds=folds)
