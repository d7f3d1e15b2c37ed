"""Deployed kit or simulator, decided from the kit's own startup files through NVFlare's public Workspace API: a job
can set a hospital's site settings only where there is no kit."""

import json

import pytest
from nvflare.apis.fl_constant import WorkspaceConstants
from nvflare.apis.fl_context import FLContextManager
from nvflare.apis.workspace import Workspace

from fedmed.flare.executor import (
    FedMedTrainer,
    SiteSettingsRefused,
    is_deployed_kit,
    running_in_simulator,
    scope_in_privacy_file,
)
from fedmed.job.tasks import CHEST_XRAY14


def _workspace(root, kit: bool) -> Workspace:
    """A client workspace as NVFlare lays it out: a provisioned kit's startup/ holds fed_client.json (beside its
    certificates); the simulator creates startup/ and local/ empty for each site."""
    (root / WorkspaceConstants.SITE_FOLDER_NAME).mkdir(parents=True)
    startup = root / WorkspaceConstants.STARTUP_FOLDER_NAME
    startup.mkdir()
    if kit:
        (startup / WorkspaceConstants.CLIENT_STARTUP_CONFIG).write_text(json.dumps({"format_version": 2}))
        (startup / "client.crt").write_text("certificate")
    return Workspace(str(root), "hospital-a")


class _Engine:
    """The one thing the executor asks NVFlare's client engine here: the site's workspace."""

    def __init__(self, workspace):
        self.workspace = workspace

    def get_workspace(self):
        return self.workspace


def _context(workspace):
    return FLContextManager(engine=_Engine(workspace), identity_name="hospital-a", job_id="job-1").new_context()


@pytest.mark.parametrize(
    "kit, deployed",
    [
        (True, True),  # a provisioned kit: startup/fed_client.json
        (False, False),  # the simulator's site workspace: an empty startup/
    ],
)
def test_a_kit_is_told_from_a_simulator_workspace_by_its_startup_files(tmp_path, kit, deployed):
    workspace = _workspace(tmp_path / "site", kit)
    assert is_deployed_kit(workspace) is deployed
    assert running_in_simulator(_context(workspace)) is not deployed


def test_no_workspace_counts_as_a_deployed_kit():
    # The stricter answer: a context without an engine never honours job-supplied site settings.
    assert is_deployed_kit(None)
    assert not running_in_simulator(FLContextManager(identity_name="hospital-a").new_context())


@pytest.mark.parametrize("kit", [True, False])
def test_a_job_naming_site_settings_is_refused_in_a_kit_and_honoured_in_the_simulator(tmp_path, kit):
    trainer = FedMedTrainer({"name": "j", "task": CHEST_XRAY14.name}, site_config="/job/supplied/fedmed_site.json")
    ctx = _context(_workspace(tmp_path / "site", kit))
    if kit:
        with pytest.raises(SiteSettingsRefused, match=r"the job sets site_config='/job/supplied/fedmed_site.json'"):
            trainer._refuse_job_settings(ctx)
    else:
        trainer._refuse_job_settings(ctx)  # the simulator has no kit: its sites take their settings from the job


PRIVACY = {
    "scopes": [
        {"name": "dp_strict", "properties": {"fedmed_privacy": {"epsilon": 5.5}}},
        {"name": "public", "properties": {}},
    ],
    "default_scope": "public",
}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dp_strict", ("dp_strict", {"fedmed_privacy": {"epsilon": 5.5}})),  # the scope the job names
        ("", ("public", {})),  # a job naming none gets the default scope, as NVFlare's privacy manager resolves it
        ("nosuch", None),  # a scope the site does not define
    ],
)
def test_the_simulators_scope_is_read_from_the_sites_privacy_file(tmp_path, name, expected):
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(PRIVACY))
    assert scope_in_privacy_file(path, name) == expected


def test_no_privacy_file_means_no_scope_and_a_broken_one_is_named(tmp_path):
    assert scope_in_privacy_file(tmp_path / "privacy.json", "dp_strict") is None
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"scopes": [{"properties": {}}]}))  # a scope without a name
    with pytest.raises(ValueError, match=r"broken.json is not a valid NVFlare privacy file"):
        scope_in_privacy_file(broken, "")
