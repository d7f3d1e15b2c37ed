"""The real FedMedTrainer with signatures on: it trains only on a global model the server signed, and signs its update."""

import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.utils import fobs

from conftest import over_the_wire
from fedmed.flare import signatures as wire_sig
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.security import signing
from fedmed.security.signing import SignatureError


def _signing_trainer(tiny_hospitals, tmp_path, signing_keys, monkeypatch):
    """The real FedMedTrainer of hospital-a with signatures on, set up as at START_RUN, and a sender of global models.
    Its settings come as job arguments, which only NVFlare's simulator honours: run it as the simulator would."""
    import json

    import fedmed.flare.executor as executor_module

    monkeypatch.setattr(executor_module, "running_in_simulator", lambda fl_ctx: True)
    from nvflare.apis.fl_context import FLContextManager
    from nvflare.apis.signal import Signal

    from fedmed.flare.executor import FedMedTrainer
    from fedmed.models.network import build_densenet121, state_to_numpy

    common_decomposers.register()
    site = "hospital-a"
    cfg = tmp_path / "fedmed_site.json"
    cfg.write_text(
        json.dumps(
            {
                "site_name": site,
                "data": {
                    "format": "dicom",
                    "root": str(tiny_hospitals / site / "dicom"),
                    "labels_csv": str(tiny_hospitals / site / "labels.csv"),
                },
                "resources": {"num_threads": 1},
            }
        )
    )
    local = tmp_path / "local"
    signing.generate_site_keys(local, site)
    server_pub = tmp_path / "server.pub"
    server_pub.write_text(signing_keys["server"].public.to_json())
    signing.install_public_keys(server_pub, local / signing.SERVER_KEY_FILE, "server")
    site_pub = signing.load_public_keys(local / signing.PUBLIC_FILE)

    ex = FedMedTrainer(
        {"name": "j", "task": CHEST_XRAY14.name, "image_size": 32, "batch_size": 4},
        site_config=str(cfg),
        signatures=True,
        signing_key_dir=str(local),
    )
    ctx = FLContextManager(identity_name=site, job_id="job-1").new_context()
    ex._setup(ctx)
    params = state_to_numpy(build_densenet121(14))

    def send(signed_by=None, tamper=None, round_num=0):
        model = FLModel(params_type=ParamsType.FULL, params=params, current_round=round_num, total_rounds=1)
        if signed_by is not None:
            wire_sig.sign_global(model, "job-1", round_num, signed_by)
        shareable = fobs.loads(fobs.dumps(FLModelUtils.to_shareable(model)))
        if tamper:
            tamper(shareable)
        return ex.execute("train", shareable, ctx, Signal())

    send.executor, send.ctx, send.params = ex, ctx, params  # for tests that send other tasks
    return send, site_pub


def test_the_executor_refuses_a_global_model_the_server_did_not_sign(
    tiny_hospitals, tmp_path, signing_keys, monkeypatch
):
    """Unsigned, signed by a hospital, or altered after signing: refused before anything is decrypted or trained."""
    from nvflare.apis.fl_constant import ReturnCode

    send, _ = _signing_trainer(tiny_hospitals, tmp_path, signing_keys, monkeypatch)
    assert send().get_return_code() == ReturnCode.BAD_TASK_DATA  # unsigned
    assert send(signing_keys["hospital-a"]).get_return_code() == ReturnCode.BAD_TASK_DATA  # signed by a hospital

    def swap_weights(shareable):
        first = sorted(shareable["DXO"]["data"])[0]
        shareable["DXO"]["data"][first] = shareable["DXO"]["data"][first] + 1.0

    assert send(signing_keys["server"], swap_weights).get_return_code() == ReturnCode.BAD_TASK_DATA


def test_the_executor_trains_on_a_signed_global_model_and_signs_its_update(
    tiny_hospitals, tmp_path, signing_keys, monkeypatch
):
    from nvflare.apis.fl_constant import ReturnCode

    send, site_pub = _signing_trainer(tiny_hospitals, tmp_path, signing_keys, monkeypatch)
    site = "hospital-a"
    reply = send(signing_keys["server"])
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    result = over_the_wire(FLModelUtils.from_shareable(reply))
    wire_sig.verify_result(result, "job-1", 0, site, site_pub)  # what the server will check
    with pytest.raises(SignatureError, match="does not verify"):
        wire_sig.verify_result(result, "job-1", 0, "hospital-b", site_pub)


def test_a_site_whose_set_up_fails_answers_every_task_with_the_reason(tmp_path, monkeypatch):
    # Not system_panic: the job process stays up, so the server hears why at once instead of waiting for the site.
    import json

    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_context import FLContextManager
    from nvflare.apis.signal import Signal

    import fedmed.flare.executor as executor_module
    from fedmed.flare.executor import FedMedTrainer
    from fedmed.job import constants as C

    monkeypatch.setattr(executor_module, "running_in_simulator", lambda fl_ctx: True)
    common_decomposers.register()
    cfg = tmp_path / "fedmed_site.json"
    cfg.write_text(
        json.dumps(
            {
                "site_name": "hospital-a",
                "synthetic_rehearsal": True,
                "data": {
                    "format": "dicom",
                    "root": str(tmp_path / "not-mounted"),
                    "labels_csv": str(tmp_path / "not-mounted" / "labels.csv"),
                },
            }
        )
    )
    ex = FedMedTrainer({"name": "j", "task": "chest_xray14", "image_size": 32}, site_config=str(cfg))
    ctx = FLContextManager(identity_name="hospital-a", job_id="job-1").new_context()
    ex.handle_event(EventType.START_RUN, ctx)
    for task in ("train", C.TASK_FINAL_MODEL):
        reply = FLModelUtils.from_shareable(
            ex.execute(task, FLModelUtils.to_shareable(FLModel(params={})), ctx, Signal())
        )
        reason = reply.meta[C.META_UNAVAILABLE]
        assert reason.startswith("FileNotFoundError: ") and "not-mounted" in reason and not reply.params


def test_a_model_signed_for_cross_site_evaluation_is_scored_and_never_trained(
    tiny_hospitals, tmp_path, signing_keys, monkeypatch
):
    """The server signs what it sends for cross-site evaluation under a round no training round has (the site takes
    the round from the task): the site scores it, refuses it unsigned, and the same signed model sent as a training
    task fails its signature check."""
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.signal import Signal
    from nvflare.app_common.app_constant import AppConstants

    from fedmed.job import constants as C

    send, _ = _signing_trainer(tiny_hospitals, tmp_path, signing_keys, monkeypatch)
    ex, ctx = send.executor, send.ctx

    def model(signed: bool):
        m = FLModel(params_type=ParamsType.FULL, params=send.params)
        m.meta[AppConstants.MODEL_OWNER] = "global"
        if signed:
            wire_sig.sign_global(m, "job-1", C.CROSS_SITE_ROUND, signing_keys["server"])
        return fobs.loads(fobs.dumps(FLModelUtils.to_shareable(m)))

    unsigned = ex.execute(AppConstants.TASK_VALIDATION, model(False), ctx, Signal())
    assert unsigned.get_return_code() == ReturnCode.BAD_TASK_DATA
    scored = FLModelUtils.from_shareable(ex.execute(AppConstants.TASK_VALIDATION, model(True), ctx, Signal()))
    assert scored.meta[AppConstants.MODEL_OWNER] == "global" and scored.meta[C.META_NUM_SAMPLES] == len(ex._val_ds)
    assert scored.metrics and all(0.0 <= v <= 1.0 for v in scored.metrics.values())
    replayed = ex.execute("train", model(True), ctx, Signal())
    assert replayed.get_return_code() == ReturnCode.BAD_TASK_DATA and ex._state.last_local is None  # nothing trained
