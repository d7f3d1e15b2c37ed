"""A global model whose outputs are NaN or the same for every input is flagged in the round it appears (an alert,
no score, never the best model), at the server, with or without a test set."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmed.flare.round_scoring import RoundScorer
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.models.model_health import check_outputs, probe_images
from fedmed.models.network import build_densenet121, state_to_numpy
from fedmed.store.repository import AlertRecord, Repository, RoundRecord, UpdateRecord

SIZE = 32  # the check needs no realistic size; small keeps DenseNet-121 fast


def _params(break_it=None) -> dict:
    torch.manual_seed(0)
    params = state_to_numpy(build_densenet121(14))
    if break_it == "nan_statistics":  # e.g. a BatchNorm variance that overflowed in aggregation
        key = next(k for k in params if k.endswith("running_var"))
        params[key] = np.full_like(params[key], np.nan)
    if break_it == "collapsed":  # the classifier ignores its input: every image gets the same logits
        key = next(k for k in params if k.startswith("class_layers") and k.endswith("weight"))
        params[key] = np.zeros_like(params[key])
    return params


def _check(params):
    model = build_densenet121(14)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    return check_outputs(model, probe_images(SIZE))


def test_a_healthy_model_passes_with_outputs_that_depend_on_the_input():
    check = _check(_params())
    assert check.problem is None and check.non_finite == 0 and check.spread > 1e-3


@pytest.mark.parametrize(
    "break_it, reason",
    [
        ("nan_statistics", "outputs are not finite (NaN or infinite) on 4 of 4 probe images"),  # NaN everywhere
        ("collapsed", "has collapsed: its outputs are the same for all 4 probe images"),  # constant answers
    ],
)
def test_an_unusable_model_is_named_with_why(break_it, reason):
    problem = _check(_params(break_it)).problem
    assert reason in problem and "will not be picked as best" in problem


def test_the_probe_images_are_the_same_every_round():
    assert torch.equal(probe_images(SIZE), probe_images(SIZE))


def test_the_controller_flags_an_unusable_aggregate_but_cannot_read_an_encrypted_one():
    scorer = RoundScorer(CHEST_XRAY14, SIZE, build_densenet121(14))
    assert scorer.unusable(SimpleNamespace(encrypted=None, params=_params())) is None
    nan_round = SimpleNamespace(encrypted=None, params=_params("nan_statistics"))
    assert "not finite" in scorer.unusable(nan_round)
    assert scorer.unusable(SimpleNamespace(encrypted={"x": b""}, params={})) is None


def test_the_alert_is_recorded_with_the_round_about_no_site(tmp_path):
    repo = Repository(f"sqlite:///{tmp_path / 'a.db'}")
    repo.start_run("u", "nan", "job", "fedavg", 1, {})
    alert = AlertRecord(None, "global_model_unusable", "the global model's outputs are not finite ...")
    repo.record_round("u", RoundRecord(1, (UpdateRecord("hospital-a", "accepted", 10),), alerts=(alert,)))
    run_id = repo.latest_run_id()
    assert repo.alerts(run_id) == [{"round": 1, "site": "", "kind": "global_model_unusable", "message": alert.message}]
    assert repo.rounds_table(run_id)[0].score is None and repo.get_run(run_id).best_round is None
    assert repo.verify_audit() is None  # the audit chain covers a site-less alert row
    from fedmed.cli.rounds_table import format_table

    assert f"round 1: ALERT {alert.message}" in format_table(repo, run_id).splitlines()  # the admin's table says why
    repo.close()


@pytest.mark.parametrize(
    "break_it, reason",
    [
        ("nan_statistics", "outputs are not finite (NaN or infinite) on 2 of 2 probe images"),
        ("exploding", "outputs are not finite (NaN or infinite) on 2 of 2 probe images"),  # finite weights, inf out
        ("collapsed", "has collapsed: its outputs are the same for all 2 probe images"),
    ],
)
def test_the_round_scorers_cheaper_check_still_refuses_every_kind_of_unusable_aggregate(break_it, reason):
    params = _params(None if break_it == "exploding" else break_it)
    if break_it == "exploding":  # every weight finite, the logits overflow float32
        key = next(k for k in params if k.startswith("class_layers") and k.endswith("weight"))
        params[key] = np.full_like(params[key], 3e38)
        assert all(np.isfinite(v).all() for v in params.values())
    model = build_densenet121(14)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problem = RoundScorer(CHEST_XRAY14, SIZE, model).unusable(SimpleNamespace(encrypted=None, params=params))
    assert reason in problem and "will not be picked as best" in problem
    # checked in place of the evaluation model's own weights: the model the scoring loads is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_round_scorers_check_gives_the_loaded_models_outputs_and_names_a_mismatch():
    params = _params()
    model = build_densenet121(14)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in params.items()})
    images = probe_images(SIZE, n=2)
    from fedmed.flare.round_scoring import _tensors_of

    assert check_outputs(build_densenet121(14), images, _tensors_of(model, params)) == check_outputs(model, images)
    scorer = RoundScorer(CHEST_XRAY14, SIZE, model)
    missing = {k: v for k, v in params.items() if not k.endswith("running_var")}
    with pytest.raises(ValueError, match="model parameters do not match: missing .*running_var"):
        scorer.unusable(SimpleNamespace(encrypted=None, params=missing))
    key = next(k for k in params if k.startswith("class_layers") and k.endswith("weight"))
    with pytest.raises(ValueError, match=f"parameter {key}: shape"):
        scorer.unusable(SimpleNamespace(encrypted=None, params={**params, key: params[key][:3]}))
