import numpy as np
import pytest
import torch

from fedmed.data.loading import load_train_val
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.learning.training import LocalTraining, TrainingAborted, evaluate, round_share, train_epochs
from fedmed.models.network import build_densenet121, load_numpy_state, state_to_numpy
from fedmed.site.site_config import DataConfig


@pytest.fixture(scope="module")
def site_data(tiny_hospitals):
    site = tiny_hospitals / "hospital-b"  # the MONOCHROME1 / CR site
    return load_train_val(
        DataConfig("dicom", site / "dicom", site / "labels.csv"), image_size=64, seed=0, task=CHEST_XRAY14
    )


def test_one_epoch_changes_the_model_and_reports_metrics(site_data):
    train, val = site_data
    torch.manual_seed(0)
    model = build_densenet121(14)
    before = state_to_numpy(model)
    epochs = []
    loss = train_epochs(
        model,
        train,
        LocalTraining(1, 1e-3, 4, seed=0),
        task=CHEST_XRAY14,
        on_epoch_end=lambda e, loss_: epochs.append((e, loss_)),
    )
    after = state_to_numpy(model)
    assert np.isfinite(loss) and epochs == [(1, pytest.approx(loss))]
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    ev = evaluate(model, val, CHEST_XRAY14)
    assert ev.num_samples == len(val) and np.isfinite(ev.loss)
    assert all(0.0 <= v <= 1.0 for v in ev.aurocs.values())


def test_abort_stops_between_batches(site_data):
    train, _ = site_data
    with pytest.raises(TrainingAborted, match="epoch 1"):
        train_epochs(
            build_densenet121(14),
            train,
            LocalTraining(1, 1e-3, 4, seed=0),
            task=CHEST_XRAY14,
            should_abort=lambda: True,
        )


def test_state_round_trip_and_mismatch_is_named():
    m = build_densenet121(14)
    params = state_to_numpy(m)
    load_numpy_state(m, params)
    bad = dict(params)
    bad["class_layers.out.weight"] = np.zeros((3, 1024), np.float32)
    with pytest.raises(ValueError, match="class_layers.out.weight: shape"):
        load_numpy_state(m, bad)
    del bad["class_layers.out.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(m, bad)


def test_training_only_chosen_layers_keeps_the_rest_frozen(site_data):
    train, _ = site_data
    torch.manual_seed(0)
    model = build_densenet121(14, norm="group")
    before = state_to_numpy(model)
    train_epochs(
        model,
        train,
        LocalTraining(1, 1e-3, 4, seed=0, trainable=["features.norm5.", "class_layers.out."]),
        task=CHEST_XRAY14,
    )
    after = state_to_numpy(model)
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved == {"features.norm5.weight", "features.norm5.bias", "class_layers.out.weight", "class_layers.out.bias"}
    assert all(p.requires_grad for p in model.parameters())


def test_round_shares_cover_every_image_once_per_cycle_and_change_between_cycles():
    cycle = [round_share(10, r, 4, seed=7) for r in range(4)]
    assert sorted(int(i) for s in cycle for i in s) == list(range(10))  # one epoch over every image
    assert sorted(len(s) for s in cycle) == [2, 2, 3, 3]
    again = [round_share(10, r, 4, seed=7) for r in range(4, 8)]
    assert sorted(int(i) for s in again for i in s) == list(range(10))
    assert any(not np.array_equal(a, b) for a, b in zip(cycle, again))  # a fresh permutation each cycle
    assert np.array_equal(round_share(10, 2, 4, seed=7), cycle[2])  # a rerun round sees the same share
    assert sorted(round_share(10, 5, 1, seed=7).tolist()) == list(range(10))  # k = 1: the whole set each round


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rounds_per_epoch": 0}, "rounds_per_epoch must be an integer >= 1"),
        ({"rounds_per_epoch": 2, "epochs": 2}, "epochs must be 1"),
    ],
)
def test_bad_round_shares_are_refused_naming_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        LocalTraining(**changes)


def test_a_share_larger_than_the_site_is_refused_naming_the_images():
    with pytest.raises(ValueError, match=r"rounds_per_epoch must be in \[1, 3\]"):
        round_share(3, 0, 4, seed=0)
