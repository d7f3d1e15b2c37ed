"""provision/project.yml through the real `nvflare provision`, and site_configs installed into the kits."""

import json
from pathlib import Path

import pytest
import tenseal as ts

from fedmed.cli.federation import Federation
from fedmed.cli.install_kit import install, merge_resources

HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]


def write_site_configs(dest: Path, data_root: Path) -> Path:
    """dest/<site>/fedmed_site.json for hospitals generated under data_root (relative paths, as IT may write)."""
    for site in HOSPITALS:
        (dest / site).mkdir(parents=True, exist_ok=True)
        rel = Path("..") / ".." / data_root.relative_to(dest.parent) / site if data_root.is_relative_to(dest.parent) \
            else data_root / site
        cfg = {"site_name": site, "data": {"format": "dicom", "root": str(rel / "dicom"),
                                           "labels_csv": str(rel / "labels.csv")}, "resources": {"num_threads": 1}}
        (dest / site / "fedmed_site.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    configs = write_site_configs(root / "configs", root / "data")
    fed = Federation(root / "fed")
    fed.provision(port=18990, db_url="sqlite:////var/lib/fedmed/test.db", site_configs=configs)
    return fed


def test_project_provisions_server_hospitals_and_admin_roles(provisioned):
    state = provisioned.state
    assert state["hospitals"] == HOSPITALS and state["port"] == 18990
    assert sorted(state["admins"].values()) == ["lead", "member", "org_admin", "project_admin"]
    server = json.loads((provisioned.kit("server") / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server["service"]["scheme"] == "grpc" and server["connection_security"] == "mtls"
    assert server["service"]["target"].endswith(":18990")
    for site in HOSPITALS:
        client = json.loads((provisioned.kit(site) / "startup" / "fed_client.json").read_text())
        # Hospitals dial the server's default_host, which is in its certificate's names.
        assert client["servers"][0]["service"]["target"] == "localhost:18990"
        assert client["client"]["fqsn"] == site and client["servers"][0]["identity"] == "server"
        assert (provisioned.kit(site) / "startup" / "client.key").is_file()
    admin = json.loads((provisioned.kit("admin@fedmed.org") / "startup" / "fed_admin.json").read_text())["admin"]
    assert admin["host"] == "localhost" and admin["port"] == 18990


def test_he_contexts_hospitals_hold_the_secret_key_and_the_server_does_not(provisioned):
    server_ctx = ts.context_from((provisioned.kit("server") / "startup" / "server_context.tenseal").read_bytes())
    assert not server_ctx.is_private() and server_ctx.is_public()
    secrets = []
    for site in HOSPITALS:
        ctx = ts.context_from((provisioned.kit(site) / "startup" / "client_context.tenseal").read_bytes())
        assert ctx.is_private()
        secrets.append(ctx.serialize(save_secret_key=True))
    assert len(set(secrets)) == 1  # one shared key pair: the server can aggregate what any hospital encrypts
    # HEBuilder runs before SignatureBuilder, so the contexts are signed (NVFlare's HE loader requires it).
    for name, ctx_file in [("server", "server_context.tenseal"), ("hospital-a", "client_context.tenseal")]:
        signed = json.loads((provisioned.kit(name) / "startup" / "signature.json").read_text())
        assert ctx_file in signed


def test_installed_kits_allow_fedmed_keep_state_out_of_tmp_and_carry_site_policies(provisioned):
    server_local = provisioned.kit("server") / "local"
    resources = json.loads((server_local / "resources.json").read_text())
    assert "fedmed." in resources["class_allow_list"]
    assert "/tmp/nvflare" not in json.dumps(resources)
    job_manager = next(c for c in resources["components"] if c["id"] == "job_manager")
    assert job_manager["args"]["uri_root"] == str(provisioned.kit("server") / "state" / "jobs-storage")
    assert any(c["path"] == "fedmed.flare.recovery.InterruptedJobRecorder" for c in resources["components"])
    assert "FEDMED_DB_URL=sqlite:////var/lib/fedmed/test.db" in (server_local / "fedmed.env").read_text()
    authz = json.loads((server_local / "authorization.json").read_text())["permissions"]
    assert authz["member"] == {"view": "any"} and authz["org_admin"]["submit_job"] == "none"
    assert authz["lead"]["submit_job"] == "any" and authz["lead"]["byoc"] == "none"
    for site in HOSPITALS:
        local = provisioned.kit(site) / "local"
        assert "fedmed." in json.loads((local / "resources.json").read_text())["class_allow_list"]
        privacy = json.loads((local / "privacy.json").read_text())
        assert privacy["default_scope"] in [s["name"] for s in privacy["scopes"]]
        site_cfg = json.loads((local / "fedmed_site.json").read_text())
        assert site_cfg["site_name"] == site
        # relative paths made absolute (against the source file's folder)
        assert site_cfg["data"]["root"] == str(provisioned.workspace.parent / "data" / site / "dicom")
        assert (provisioned.kit(site) / "start_fedmed.sh").stat().st_mode & 0o111
        assert (local / "log_config.json").is_file() and (local / "authorization.json").is_file()



def test_install_makes_each_sites_signing_keys_and_the_federation_exchanges_them(provisioned):
    import stat

    from fedmed import signing

    server_local = provisioned.kit("server") / "local"
    server_pub = signing.load_public_keys(server_local / signing.PUBLIC_FILE)
    installed = signing.load_site_public_keys(server_local)
    assert sorted(installed) == HOSPITALS
    for site in HOSPITALS:
        local = provisioned.kit(site) / "local"
        assert stat.S_IMODE((local / signing.PRIVATE_FILE).stat().st_mode) == 0o600
        keys = signing.load_site_keys(local)
        assert installed[site].fingerprint == keys.public.fingerprint
        assert signing.load_public_keys(local / signing.SERVER_KEY_FILE).fingerprint == server_pub.fingerprint
        digest = signing.update_digest("job", 0, site, {}, None, 1, {}, {})
        signing.verify(digest, signing.sign(digest, keys), installed[site])  # what the server will check
    before = (provisioned.kit("hospital-a") / "local" / signing.PRIVATE_FILE).read_text()
    install(provisioned.kit("hospital-a"), "hospital-a", check_import=False)  # a reinstall keeps the identity
    assert (provisioned.kit("hospital-a") / "local" / signing.PRIVATE_FILE).read_text() == before


def test_install_refuses_the_wrong_kit_and_a_bad_site_config(provisioned, tmp_path):
    with pytest.raises(ValueError, match="startup kit of 'hospital-a', not 'hospital-b'"):
        install(provisioned.kit("hospital-a"), "hospital-b", check_import=False)
    bad = tmp_path / "fedmed_site.json"
    bad.write_text(json.dumps({"site_name": "hospital-a", "data": {"format": "png", "root": "x"}}))
    with pytest.raises(ValueError, match="data.format must be one of"):
        install(provisioned.kit("hospital-a"), "hospital-a", site_config=bad, check_import=False)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"site_name": "hospital-b", "data": {"format": "dicom", "root": "d", "labels_csv": "l"}}))
    with pytest.raises(ValueError, match="is for site 'hospital-b', not 'hospital-a'"):
        install(provisioned.kit("hospital-a"), "hospital-a", site_config=other, check_import=False)


def test_resource_overrides_extend_the_allow_list_and_replace_components_by_id(tmp_path):
    default = {"class_allow_list": ["a.B"], "components": [{"id": "x", "args": {"p": "/tmp/x"}}, {"id": "y"}],
               "servers": [{"max_num_clients": 100}]}
    merged = merge_resources(default, {"components": [{"id": "x", "args": {"p": "{KIT}/x"}}]}, tmp_path)
    assert merged["class_allow_list"] == ["a.B", "fedmed."]
    assert merged["components"] == [{"id": "x", "args": {"p": f"{tmp_path.resolve()}/x"}}, {"id": "y"}]
    assert merged["servers"] == default["servers"]
