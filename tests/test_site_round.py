"""One site round (fedmed.site.site_round): the Executor and the in-process federation run the same function, and a site
refuses a global model that is not fresher than the last one it accepted."""

import numpy as np
import pytest
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from conftest import over_the_wire
from fedmed.data.loading import load_test, load_train_val
from fedmed.flare.wire import to_site_result
from fedmed.job import constants as C
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.sim.inprocess import FederationPlan, federate
from fedmed.site import site_round
from fedmed.site.site_config import DataConfig
from fedmed.site.site_round import GlobalModelRejected, Site, check_fresh
from test_executor_signing import _signing_trainer


@pytest.mark.parametrize(
    "last, offered, refused",
    [
        (None, 0, False),  # the job's first global model
        (None, 5, False),  # a site that joins late accepts whatever round comes first
        (1, 2, False),  # the next round
        (1, 4, False),  # rounds the site missed (absent, refused) may be skipped
        (1, 1, True),  # the same round again
        (2, 0, True),  # round 0 replayed at round 2
    ],
)
def test_a_global_model_must_be_later_than_the_last_one_accepted(last, offered, refused):
    site = Site("hospital-a", CHEST_XRAY14, train=None, model=None, last_round=last)
    if refused:
        with pytest.raises(GlobalModelRejected, match=rf"stale global model: round {offered + 1} is not later"):
            check_fresh(site, offered)
    else:
        check_fresh(site, offered)


def test_a_replayed_server_signed_global_model_is_refused_and_the_reason_reaches_the_server(
    tiny_hospitals, tmp_path, signing_keys, monkeypatch
):
    """A round-0 global model the server really signed, replayed at round 2: its signature verifies (it was signed
    for round 0), so only the site's memory refuses it; the refusal travels back as a refused update."""
    send, _ = _signing_trainer(tiny_hospitals, tmp_path, signing_keys, monkeypatch)
    server = signing_keys["server"]
    for r in (0, 2):
        assert send(server, round_num=r).get_return_code(ReturnCode.OK) == ReturnCode.OK
    trained = send.executor._state.last_local
    reply = send(server, round_num=0)
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK  # an answer with the reason, not an error
    received = to_site_result(over_the_wire(FLModelUtils.from_shareable(reply)))
    assert received.refused == (
        "global model rejected: stale global model: round 1 is not later than round 3, the last this site "
        "accepted in this job (a replayed or reordered global model)"
    )
    assert received.params is None and send.executor._state.last_local is trained  # nothing trained on it
    assert send.executor._state.last_round == 2


def test_the_executor_and_the_in_process_federation_run_the_same_site_round(
    tiny_hospitals, tmp_path, signing_keys, monkeypatch
):
    """Both reach fedmed.site.site_round.run_round, and from the same global model, data, seed and settings they release
    the same weights: no second copy of the site's round is left to diverge."""
    calls = []
    real = site_round.run_round

    def spy(site, offer, *args, **kwargs):
        update = real(site, offer, *args, **kwargs)
        calls.append((site.name, update))
        return update

    monkeypatch.setattr(site_round, "run_round", spy)
    send, _ = _signing_trainer(tiny_hospitals, tmp_path, signing_keys, monkeypatch)
    reply = FLModelUtils.from_shareable(send(signing_keys["server"]))  # hospital-a's Executor, round 1 of 1
    assert [name for name, _ in calls] == ["hospital-a"]
    assert reply.params.keys() == calls[0][1].params.keys()

    train = {
        s: load_train_val(
            DataConfig("dicom", tiny_hospitals / s / "dicom", tiny_hospitals / s / "labels.csv"), 32, 0, CHEST_XRAY14
        )[0]
        for s in ("hospital-a", "hospital-b")
    }
    test_root = tiny_hospitals / "global_test"
    test = load_test(test_root / "dicom", test_root / "labels.csv", 32, CHEST_XRAY14)
    # The Executor's defaults (lr 1e-3, one local epoch, seed 0) and the harness's batch size 4.
    plan = FederationPlan(CHEST_XRAY14, 1, "fedavg", batch_size=4, seed=0)
    federate(train, test, plan, initial_params=send.params)
    assert [name for name, _ in calls[1:]] == ["hospital-a", "hospital-b"]
    in_process = calls[1][1]
    assert in_process.meta[C.META_NUM_SAMPLES] == reply.meta[C.META_NUM_SAMPLES]
    for name, value in reply.params.items():
        np.testing.assert_array_equal(value, in_process.params[name], err_msg=name)


def _site_and_model(tiny_hospitals):
    from fedmed.models.network import build_densenet121, state_to_numpy

    train, val = load_train_val(
        DataConfig("dicom", tiny_hospitals / "hospital-a" / "dicom", tiny_hospitals / "hospital-a" / "labels.csv"),
        32,
        0,
        CHEST_XRAY14,
    )
    model = build_densenet121(CHEST_XRAY14.num_outputs)
    return Site("hospital-a", CHEST_XRAY14, train=train, model=model, val=val), state_to_numpy(model)


@pytest.mark.parametrize("broken, reason", [("nan", "not finite"), ("zero", "collapsed")])
def test_a_site_refuses_a_global_model_that_is_not_usable_and_says_why(tiny_hospitals, broken, reason):
    """A global model whose outputs are NaN (or the same for every input) is refused before training, with the
    reason the server records, and the site's freshness memory does not move."""
    site, params = _site_and_model(tiny_hospitals)
    head = [k for k in params if k.endswith("weight") and params[k].ndim == 2][-1]  # the classifier's weights
    params[head] = np.full_like(params[head], np.nan) if broken == "nan" else np.zeros_like(params[head])
    update = site_round.run_round(site, site_round.GlobalModel(params, 1, 3))
    assert update.params is None
    assert update.meta[C.META_REFUSED].startswith("global model rejected: ")
    assert reason in update.meta[C.META_REFUSED]
    assert site.last_round is None


def test_a_usable_global_model_passes_the_sites_check(tiny_hospitals):
    site, _ = _site_and_model(tiny_hospitals)  # the freshly initialised model: outputs finite and input-dependent
    site_round.check_usable(site)  # raises GlobalModelRejected otherwise


class _CountingReads:
    """A site's training set that records which images a round reads."""

    def __init__(self, base):
        self.base, self.read = base, set()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.read.add(int(i))
        return self.base[i]


def test_a_site_with_rounds_per_epoch_trains_each_round_on_its_share_and_every_image_once_a_cycle(tiny_hospitals):
    """The job's rounds_per_epoch reaches the site round: with k = 2 each round reads about half the site's images
    (a different half each round of a cycle) and the two rounds together read every image once."""
    import dataclasses

    site, params = _site_and_model(tiny_hospitals)
    site.train = _CountingReads(site.train)
    half = -(-len(site.train) // 2)  # one batch a round: none dropped
    site.training = dataclasses.replace(site.training, rounds_per_epoch=2, batch_size=half)
    seen = []
    for r in range(2):
        site.train.read = set()
        update = site_round.run_round(site, site_round.GlobalModel(params, r, 4))
        assert update.params is not None, update.meta
        seen.append(site.train.read)
    n = len(site.train)
    assert {len(s) for s in seen} <= {n // 2, n - n // 2} and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))


def test_a_site_with_fewer_images_than_rounds_per_epoch_refuses_the_round_with_the_reason(tiny_hospitals):
    """A job whose rounds_per_epoch exceeds a hospital's training images: that site refuses each round, naming the
    setting and its image count (recorded by the server as refused), instead of failing inside training."""
    import dataclasses

    site, params = _site_and_model(tiny_hospitals)
    k = len(site.train) + 1
    site.training = dataclasses.replace(site.training, rounds_per_epoch=k)
    messages = []
    update = site_round.run_round(site, site_round.GlobalModel(params, 0, 4), log=messages.append)
    reason = update.meta[C.META_REFUSED]
    assert update.params is None and f"rounds_per_epoch {k}" in reason and f"({len(site.train)})" in reason
    assert any("refusing round" in m for m in messages)
    loaded = site.model.state_dict()  # the global model as offered: nothing was trained on it
    assert all(np.array_equal(loaded[n].numpy(), np.asarray(params[n])) for n in params)
