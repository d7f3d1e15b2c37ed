"""fedmed.flare.site_memory: every site releases its task's memory once the result is sent (issue 30 item 3)."""

import json

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext

from fedmed.flare import site_memory
from fedmed.flare.site_memory import SITE_MEMORY_ID, SiteMemoryRelease
from jobscripts import load_job_script


@pytest.mark.parametrize(
    "event, releases",
    [
        (EventType.AFTER_SEND_TASK_RESULT, 1),  # the result has left the site: release
        (EventType.BEFORE_TASK_EXECUTION, 0),  # the task is about to use its memory
        (EventType.START_RUN, 0),
        (EventType.END_RUN, 0),
    ],
)
def test_release_runs_after_each_sent_result_only(monkeypatch, event, releases):
    calls = []
    monkeypatch.setattr(site_memory, "release_round_memory", lambda: calls.append(1) or True)
    SiteMemoryRelease().handle_event(event, FLContext())
    assert len(calls) == releases


def test_every_site_of_the_exported_job_has_the_release(tmp_path):
    job = load_job_script("cxr_densenet").build_job(num_rounds=3, min_clients=2)
    job.export_job(str(tmp_path))
    client_cfgs = list((tmp_path / "cxr_densenet").rglob("config_fed_client.json"))
    assert client_cfgs
    for path in client_cfgs:
        components = {c["id"]: c for c in json.loads(path.read_text())["components"]}
        assert components[SITE_MEMORY_ID]["path"] == "fedmed.flare.site_memory.SiteMemoryRelease"
