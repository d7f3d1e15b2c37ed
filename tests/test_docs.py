"""The docs' examples are accepted as written: every fedmed-submit example's job options pass the checks each
hospital makes at a job's start, every console command is listed in the README, every relative link resolves."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from fedmed.cli.generate_hospitals import write_site_config
from fedmed.privacy.policy import parse_privacy, strictest
from fedmed.site.site_config import JobRefused, check_job_for_site, load_site_config
from jobscripts import load_job_script

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "provision" / "README.md", REPO / "site_configs" / "README.md"]
DOCS += sorted((REPO / "docs").glob("*.md"))
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
SUBMIT = re.compile(r"^\s*(?:\.venv/bin/)?fedmed-submit (?P<own>.*?) -- (?P<job>.*?)(?:\s+#.*)?$")


def _examples():
    """(doc, line number, fedmed-submit's own options, the job's options) of every example that submits a job."""
    found = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            m = SUBMIT.match(line)
            if m and "--resume" not in m["own"]:  # a resumption needs a recorded run: fedmed.server.resume's tests
                found.append(pytest.param(m["own"], m["job"], id=f"{doc.relative_to(REPO)}:{n}"))
    return found


def refusal(site_cfg, privacy: dict, scope: str, norm: str):
    """Why a hospital refuses a job in `scope` with `norm`, or None: NVFlare's scope check (app_deployer: a scope
    the site's privacy.json does not list), then the Executor's own start-up rules, called as the Executor calls
    them (fedmed.site.site_config.check_job_for_site, on a deployed kit)."""
    scope = scope or privacy.get("default_scope", "")
    scopes = {s["name"]: s for s in privacy["scopes"]}
    if scope not in scopes:
        return f"privacy scope {scope!r} is not allowed"
    policy = strictest(site_cfg.privacy, parse_privacy(scopes[scope].get("properties", {}).get("fedmed_privacy")))
    try:
        check_job_for_site(site_cfg, policy, norm, where="the site", config="fedmed_site.json", simulator=False)
    except JobRefused as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def job_script():
    return load_job_script("cxr_densenet")


@pytest.mark.parametrize("own, job", _examples())
def test_every_submit_example_is_accepted_by_the_hospitals_it_runs_on(own, job, job_script, tmp_path):
    # --kit: a real deployment, on the shipped site_configs/; --workspace: fedmed-federation on the synthetic
    # hospitals (provisioned with --site-configs data/hospitals, as the quickstarts say)
    args = [a for a in shlex.split(job) if a != "..."]
    assert job_script.main(["--export-job", str(tmp_path), *args]) == 0
    (folder,) = [p for p in tmp_path.iterdir() if (p / "meta.json").is_file()]
    scope = json.loads((folder / "meta.json").read_text()).get("scope", "")
    client = json.loads(next(folder.glob("app_hospital-a/config/config_fed_client.json")).read_text())
    executor_args = client["executors"][0]["executor"].get("args", {})
    norm = executor_args["job"]["norm"]
    for site in HOSPITALS:
        if "--kit" in own:
            cfg = load_site_config(REPO / "site_configs" / site / "fedmed_site.json")
        else:
            cfg = load_site_config(write_site_config(tmp_path, site, 1))
        privacy = json.loads((REPO / "site_configs" / site / "privacy.json").read_text())
        assert refusal(cfg, privacy, scope, norm) is None, (
            f"{site} refuses `{job}`: {refusal(cfg, privacy, scope, norm)}"
        )


def test_the_rule_refuses_what_the_hospitals_refuse():
    shipped = load_site_config(REPO / "site_configs" / "hospital-a" / "fedmed_site.json")
    privacy = json.loads((REPO / "site_configs" / "hospital-a" / "privacy.json").read_text())
    assert "not allowed" in refusal(shipped, privacy, "rehersal", "group")  # the scope typo
    assert "norm='group'" in refusal(shipped, privacy, "", "batch")  # the old real-deployment example
    assert refusal(shipped, privacy, "private", "group") is None


def test_the_readme_lists_every_console_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (REPO / "README.md").read_text()
    assert [name for name in scripts if f"`{name}`" not in readme] == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    local = [link for link in links if "://" not in link and not link.startswith("mailto:")]
    assert [link for link in local if not (doc.parent / link).exists()] == []
