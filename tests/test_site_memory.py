"""What each simulated or deployed site gets from the job: its end-of-task memory release (issue 30 item 3) and, in the
simulator, its share of the cores (item 2)."""

import json
import os

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


def test_the_simulator_shares_the_cores_among_the_sites_it_trains_at_once(monkeypatch, tmp_path):
    from fedmed.flare import fedjob
    from fedmed.server import parallel

    seen = {}

    class FakeSimEnv:  # records what the site processes would inherit, instead of starting NVFlare
        def __init__(self, clients, num_threads, workspace_root):
            self.threads = num_threads

        def deploy(self, job):
            seen[self.threads] = os.environ.get(parallel.ENV_SITE_THREADS)

    class Job:
        name = "job"

    monkeypatch.setattr(fedjob, "SimEnv", FakeSimEnv)
    monkeypatch.setattr(parallel, "available_cores", lambda: 4)
    monkeypatch.delenv(parallel.ENV_SITE_THREADS, raising=False)
    for threads in (1, 2, 3):
        fedjob.run_simulation(Job(), ["a", "b", "c"], tmp_path, threads)
    assert seen == {1: "4", 2: "2", 3: "1"}
    assert parallel.ENV_SITE_THREADS not in os.environ  # this process's own setting is left as it was
    monkeypatch.setenv(parallel.ENV_SITE_THREADS, "3")  # the caller's choice wins
    fedjob.run_simulation(Job(), ["a"], tmp_path, 2)
    assert seen[2] == "3" and os.environ[parallel.ENV_SITE_THREADS] == "3"
