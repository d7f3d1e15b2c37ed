"""provision/project.yml through the real `nvflare provision`, and site_configs installed into the kits."""

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import tenseal as ts

from fedmed.cli.federation import Federation
from fedmed.cli.install_kit import install, merge_resources
from fedmed.paths import CHECKOUT as REPO
from fedmed.security.he_keys import make_key_set

HOSPITALS = ["hospital-a", "hospital-b", "hospital-c"]


def write_site_configs(dest: Path, data_root: Path) -> Path:
    """dest/<site>/fedmed_site.json for hospitals generated under data_root (relative paths, as IT may write)."""
    for site in HOSPITALS:
        (dest / site).mkdir(parents=True, exist_ok=True)
        rel = (
            Path("..") / ".." / data_root.relative_to(dest.parent) / site
            if data_root.is_relative_to(dest.parent)
            else data_root / site
        )
        cfg = {
            "site_name": site,
            "data": {"format": "dicom", "root": str(rel / "dicom"), "labels_csv": str(rel / "labels.csv")},
            "resources": {"num_threads": 1},
            "synthetic_rehearsal": True,
        }  # generated images: the only data a site may train without DP
        (dest / site / "fedmed_site.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("prov")
    configs = write_site_configs(root / "configs", root / "data")
    fed = Federation(root / "fed")
    make_key_set(root / "custodian")  # a hospital's key custodian, not provisioning, makes the CKKS keys
    fed.provision(
        port=18990, db_url="sqlite:////var/lib/fedmed/test.db", site_configs=configs, he_keys=root / "custodian"
    )
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


def _secret_key_windows(client_context: bytes) -> list[bytes]:
    """Byte windows of the custodian's CKKS secret key as SEAL serialises it (they appear verbatim inside a client
    context, so a copy of the key in any file, under any name, contains them)."""
    with tempfile.TemporaryDirectory() as tmp:
        ts.context_from(client_context).secret_key().data.save(f"{tmp}/sk")
        raw = Path(f"{tmp}/sk").read_bytes()
    return [raw[i : i + 64] for i in range(len(raw) // 4, len(raw) - 64, len(raw) // 4)]


def _holds_secret(path: Path, windows) -> bool:
    data = path.read_bytes()
    if any(w in data for w in windows):
        return True
    try:
        return ts.context_from(data).is_private()  # any TenSEAL context, under any name, with a secret key
    except Exception:
        return False


def test_no_file_of_the_provisioning_workspace_or_the_server_kit_holds_a_secret_key(provisioned, tmp_path):
    keys = provisioned.workspace.parent / "custodian"  # made at a hospital, outside the provisioning machine
    windows = _secret_key_windows((keys / "hospitals" / "client_context.tenseal").read_bytes())
    assert _holds_secret(keys / "hospitals" / "client_context.tenseal", windows)  # the scan does find the key
    # The FL admin's machine: provisioning, then the server kit installed with the custodian's server context (the
    # hospital kits leave this machine before their IT installs the secret context).
    fed = Federation(tmp_path / "admin")
    fed.provision(port=18991, install_sites=False)
    install(fed.kit("server"), "server", he_context=keys / "server" / "server_context.tenseal", check_import=False)
    scanned = [p for p in fed.workspace.rglob("*") if p.is_file()]
    assert len(scanned) > 20 and fed.kit("server") / "startup" / "server_context.tenseal" in scanned
    assert [str(p) for p in scanned if _holds_secret(p, windows)] == []
    # the installed federation's server kit too (its hospitals share this test machine)
    assert [str(p) for p in provisioned.kit("server").rglob("*") if p.is_file() and _holds_secret(p, windows)] == []
    server_ctx = ts.context_from((provisioned.kit("server") / "startup" / "server_context.tenseal").read_bytes())
    assert not server_ctx.is_private() and server_ctx.is_public()
    for site in HOSPITALS:  # each hospital kit got the custodian's secret context and its key id at install
        local = provisioned.kit(site) / "local"
        assert ts.context_from((local / "client_context.tenseal").read_bytes()).is_private()
        assert (local / "he_key_id.txt").read_text().strip() == (
            keys / "hospitals" / "he_key_id.txt"
        ).read_text().strip()
        assert not list((provisioned.kit(site) / "startup").glob("*.tenseal"))  # provisioning made none


def test_install_refuses_swapped_he_contexts(provisioned):
    keys = provisioned.workspace.parent / "custodian"
    with pytest.raises(PermissionError, match="holds a CKKS secret key"):
        install(
            provisioned.kit("server"),
            "server",
            he_context=keys / "hospitals" / "client_context.tenseal",
            check_import=False,
        )
    with pytest.raises(PermissionError, match="holds no CKKS secret key"):
        install(
            provisioned.kit("hospital-a"),
            "hospital-a",
            he_context=keys / "server" / "server_context.tenseal",
            check_import=False,
        )
    server_ctx = provisioned.kit("server") / "startup" / "server_context.tenseal"
    assert not ts.context_from(server_ctx.read_bytes()).is_private()


def test_installed_kits_allow_fedmed_keep_state_out_of_tmp_and_carry_site_policies(provisioned):
    server_local = provisioned.kit("server") / "local"
    resources = json.loads((server_local / "resources.json").read_text())
    assert "fedmed." in resources["class_allow_list"]
    assert "/tmp/nvflare" not in json.dumps(resources)
    job_manager = next(c for c in resources["components"] if c["id"] == "job_manager")
    assert job_manager["args"]["uri_root"] == str(provisioned.kit("server") / "state" / "jobs-storage")
    assert any(c["path"] == "fedmed.flare.recovery.InterruptedJobRecorder" for c in resources["components"])
    server_env = (server_local / "fedmed.env").read_text()
    assert "FEDMED_DB_URL=sqlite:////var/lib/fedmed/test.db" in server_env
    # a site gone from a job stops holding up rounds within about a minute (NVFlare's template waits 600 s)
    assert "NVFLARE_DEAD_CLIENT_GRACE_PERIOD=10" in server_env
    assert resources["servers"][0]["heart_beat_timeout"] == 60
    assert resources["servers"][0]["admin_storage"] == "transfer"  # NVFlare's other per-server settings kept
    authz = json.loads((server_local / "authorization.json").read_text())["permissions"]
    assert authz["member"] == {"view": "any"} and authz["org_admin"]["submit_job"] == "none"
    # only the project admin submits jobs (a lead could otherwise send jobs to every hospital)
    assert authz["lead"]["submit_job"] == "none" and authz["lead"]["byoc"] == "none"
    assert [role for role, perms in authz.items() if perms == "any" or perms.get("submit_job", "none") != "none"] == [
        "project_admin"
    ]
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

    from fedmed.security import signing

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
    no_dp = tmp_path / "no_dp.json"
    no_dp.write_text(
        json.dumps({"site_name": "hospital-a", "data": {"format": "dicom", "root": "d", "labels_csv": "l"}})
    )
    with pytest.raises(ValueError, match="has no 'privacy' policy: a hospital's own config must set its DP ceiling"):
        install(provisioned.kit("hospital-a"), "hospital-a", site_config=no_dp, check_import=False)
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps({"site_name": "hospital-b", "data": {"format": "dicom", "root": "d", "labels_csv": "l"}})
    )
    with pytest.raises(ValueError, match="is for site 'hospital-b', not 'hospital-a'"):
        install(provisioned.kit("hospital-a"), "hospital-a", site_config=other, check_import=False)


def test_resource_overrides_extend_the_allow_list_and_replace_components_by_id(tmp_path):
    default = {
        "class_allow_list": ["a.B"],
        "components": [{"id": "x", "args": {"p": "/tmp/x"}}, {"id": "y"}],
        "servers": [{"max_num_clients": 100}],
    }
    merged = merge_resources(default, {"components": [{"id": "x", "args": {"p": "{KIT}/x"}}]}, tmp_path)
    assert merged["class_allow_list"] == ["a.B", "fedmed."]
    assert merged["components"] == [{"id": "x", "args": {"p": f"{tmp_path.resolve()}/x"}}, {"id": "y"}]
    assert merged["servers"] == default["servers"]


@pytest.mark.parametrize("site", HOSPITALS)
def test_shipped_hospital_configs_carry_a_dp_policy_and_the_no_dp_scope_says_what_it_is_for(site):
    from fedmed.site.site_config import load_site_config

    cfg = load_site_config(REPO / "site_configs" / site / "fedmed_site.json")
    assert cfg.privacy is not None and cfg.privacy.lifetime_epsilon is not None and not cfg.synthetic_rehearsal
    scopes = {
        s["name"]: s["properties"]
        for s in json.loads((REPO / "site_configs" / site / "privacy.json").read_text())["scopes"]
    }
    assert all(
        props.get("fedmed_privacy") or "synthetic rehearsal data only" in props.get("note", "")
        for props in scopes.values()
    )


def test_provision_refuses_an_existing_workspace_unless_forced(tmp_path, capsys):
    from fedmed.cli import federation

    fed = Federation(tmp_path / "fed")
    fed.provision(port=18993, install_sites=False)
    root_ca = fed.kit("server") / "startup" / "rootCA.pem"
    first_ca = root_ca.read_bytes()
    (fed.kit("admin@fedmed.org") / "transfer" / "a-downloaded-job").mkdir(parents=True)
    (fed.kit("server") / "state" / "jobs-storage" / "a-job").mkdir(parents=True)
    with pytest.raises(FileExistsError) as refused:
        fed.provision(port=18993, install_sites=False)
    message = str(refused.value)
    for what in (
        "the root CA and every certificate",
        "startup kits: admin@fedmed.org",
        "hospital-a",
        "the server's job store: 1 job(s)",
        "1 downloaded job result(s)",
        "--force",
    ):
        assert what in message
    assert root_ca.read_bytes() == first_ca  # nothing was touched
    assert federation.main(["provision", "--workspace", str(fed.workspace), "--port", "18993"]) == 2
    assert "provision refused:" in capsys.readouterr().err
    fed.provision(port=18993, install_sites=False, force=True)
    assert (
        root_ca.read_bytes() != first_ca
        and not (fed.kit("admin@fedmed.org") / "transfer" / "a-downloaded-job").exists()
    )


def test_server_without_a_db_url_records_into_its_own_kit(tmp_path):
    fed = Federation(tmp_path / "fed")
    fed.provision(port=18994, install_sites=False)
    install(fed.kit("server"), "server", check_import=False)
    # written out where the admin's tools (fedmed-submit --workspace) and the server's start check read it
    assert fed.db_url() == f"sqlite:///{fed.kit('server') / 'fedmed.db'}"
    from fedmed.cli.install_kit import check_kit

    assert check_kit(fed.kit("server")) == [
        f"server: run record {fed.db_url()}",
        f"server: audit key {fed.kit('server') / 'local' / 'audit_key'} (made when the server first opens the record)",
        "server: listening for hospitals and admins at server:18994",
    ]


def test_a_server_recording_to_postgresql_gets_its_audit_key_at_install(tmp_path):
    """A PostgreSQL record has no folder for its key: install makes <kit>/local/audit_key (0600, kept across
    reinstalls) and names it in local/fedmed.env; a kit whose env lost it is refused before the server starts, with
    the fix in one line."""
    import stat

    from fedmed.cli.install_kit import check_kit, read_env, write_env

    fed = Federation(tmp_path / "fed")
    fed.provision(port=18995, install_sites=False)
    kit = fed.kit("server")
    url = "postgresql+psycopg2://fedmed:secret@db.example.org/fedmed"
    install(kit, "server", db_url=url, check_import=False)
    key = kit / "local" / "audit_key"
    env = read_env(kit / "local" / "fedmed.env")
    assert env["FEDMED_AUDIT_KEY_FILE"] == str(key) and stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_text()
    install(kit, "server", db_url=url, check_import=False)  # a reinstall keeps the record's key
    assert key.read_text() == first
    assert check_kit(kit)[1] == f"server: audit key {key}"
    del env["FEDMED_AUDIT_KEY_FILE"]
    write_env(kit / "local" / "fedmed.env", env)
    with pytest.raises(ValueError, match=r"no audit key for postgresql\+psycopg2://fedmed:\*\*\*@db.*install.sh"):
        check_kit(kit)


def test_preflight_refuses_a_wrong_data_path_before_the_site_starts(provisioned, capsys):
    from fedmed.cli.install_kit import main as install_main

    kit = provisioned.kit("hospital-a")  # its fedmed_site.json names data that was never generated
    assert install_main(["--check", str(kit)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pre-flight check failed: data.root ")
    assert "does not exist" in err
    # start_fedmed.sh runs the same check and does not start NVFlare
    proc = subprocess.run(["bash", str(kit / "start_fedmed.sh"), "--once"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "pre-flight check failed: data.root" in proc.stderr
    assert "not started" in proc.stderr and not (kit / "log.txt").exists()


def test_preflight_of_a_good_site_says_where_it_will_connect(provisioned, tiny_hospitals, tmp_path, monkeypatch):
    from fedmed.cli.install_kit import check_kit

    cfg = write_site_configs(tmp_path / "configs", tiny_hospitals) / "hospital-a" / "fedmed_site.json"
    monkeypatch.setenv("FEDMED_SITE_CONFIG", str(cfg))  # the site's environment wins over local/
    lines = check_kit(provisioned.kit("hospital-a"))
    assert "16 labelled image(s) for task chest_xray14" in lines[0]
    assert lines[1] == "hospital-a: waiting for the FL server at localhost:18990 (NVFlare retries until it answers)"
    wrong = json.loads(cfg.read_text())
    wrong["site_name"] = "hospital-b"
    cfg.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match="is for site 'hospital-b', but this kit is 'hospital-a'"):
        check_kit(provisioned.kit("hospital-a"))


def test_submit_errors_are_one_line_saying_what_to_do(provisioned, tmp_path, capsys):
    from fedmed.cli.site import main as site_main
    from fedmed.cli.submit_job import SubmitError, export_job
    from fedmed.cli.submit_job import main as submit_main

    admin = provisioned.kit("admin@fedmed.org")
    cases = [  # nothing listens on the provisioned port; a folder that is no kit; a workspace never provisioned
        (
            ["--kit", str(admin), "--", "--rounds", "1"],
            "cannot reach the FL server at localhost:18990 (Connection "
            "refused): is it running? (`fedmed-federation status",
        ),
        (["--kit", str(tmp_path), "--abort", "123"], "is not an admin startup kit"),
        (["--workspace", str(tmp_path / "none")], "run `fedmed-federation provision"),
    ]
    for argv, says in cases:
        assert submit_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err
    with pytest.raises(SubmitError, match=r"job options after -- were refused: .*unrecognized arguments: --roundz"):
        export_job(tmp_path, ["--roundz", "2"])
    assert site_main(["stop", str(provisioned.kit("hospital-b"))]) == 0
    assert "nothing was running" in capsys.readouterr().out


def _hospital_files(dest: Path, site: str, data_root: Path) -> Path:
    """A new hospital's own folder as its IT hands it over: fedmed_site.json and privacy.json (hospital-a's policy)."""
    dest.mkdir(parents=True, exist_ok=True)
    cfg = {
        "site_name": site,
        "data": {"format": "dicom", "root": str(data_root / "dicom"), "labels_csv": str(data_root / "labels.csv")},
        "resources": {"num_threads": 1},
        "synthetic_rehearsal": True,
    }
    (dest / "fedmed_site.json").write_text(json.dumps(cfg))
    (dest / "privacy.json").write_text((REPO / "site_configs" / "hospital-a" / "privacy.json").read_text())
    return dest


def _file_hashes(root: Path) -> dict:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(
    "name, error, says",
    [
        ("hospital-a", FileExistsError, "'hospital-a' already exists"),  # a provisioned hospital
        ("Hospital-A", FileExistsError, "'Hospital-A' already exists"),  # the same name but for case
        ("server", FileExistsError, "'server' already exists"),  # the server's identity
        ("hospital:d", ValueError, "invalid site name 'hospital:d'"),  # NVFlare's own pattern would let ':' in
        ("-rf", ValueError, "invalid site name '-rf'"),  # would read as an option
        ("../hospital-d", ValueError, "invalid site name"),  # a path
        ("", ValueError, "invalid site name ''"),
    ],
)
def test_add_site_refuses_a_name_that_exists_or_is_invalid_before_writing_anything(
    provisioned, tmp_path, name, error, says
):
    files = _hospital_files(tmp_path / "files", "hospital-d", tmp_path / "data")
    before = _file_hashes(provisioned.workspace)
    with pytest.raises(error, match=says):
        provisioned.add_site(name, files)
    assert _file_hashes(provisioned.workspace) == before


def test_add_site_refuses_a_workspace_never_provisioned_and_bad_hospital_files(provisioned, tmp_path, capsys):
    from fedmed.cli import federation

    files = _hospital_files(tmp_path / "files", "hospital-d", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="was never provisioned"):
        Federation(tmp_path / "nothing").add_site("hospital-d", files)
    assert not (tmp_path / "nothing").exists()
    assert federation.main(["add-site", "hospital-d", "--workspace", str(tmp_path / "nothing")]) == 2
    assert "add-site refused:" in capsys.readouterr().err
    before = _file_hashes(provisioned.workspace)
    with pytest.raises(FileNotFoundError, match="no site files for 'hospital-d'"):
        provisioned.add_site("hospital-d")  # no site_configs/hospital-d/ in the checkout, no --config-dir
    with pytest.raises(ValueError, match="is for site 'hospital-d', not 'hospital-e'"):
        provisioned.add_site("hospital-e", files)  # another hospital's config
    (files / "privacy.json").unlink()
    with pytest.raises(ValueError, match="privacy.json is missing"):
        provisioned.add_site("hospital-d", files)
    assert _file_hashes(provisioned.workspace) == before
    with pytest.raises(ValueError, match=r"\['hospital-d'\] are not hospitals of this federation"):
        provisioned.start(["hospital-d"])  # not added: nothing is started
    assert provisioned.running() == {}


def test_add_site_refuses_another_he_key_set(provisioned, tmp_path):
    files = _hospital_files(tmp_path / "files", "hospital-d", tmp_path / "data")
    make_key_set(tmp_path / "other_custodian")
    with pytest.raises(ValueError, match="is key set .* but the server's context is key set"):
        provisioned.add_site("hospital-d", files, he_keys=tmp_path / "other_custodian")


def test_added_hospital_gets_a_kit_of_the_same_root_ca_and_no_other_kit_file_changes(provisioned, tmp_path):
    # Last of the module's users of `provisioned`: hospital-d stays in its state.
    from cryptography import x509

    from fedmed.security import signing

    files = _hospital_files(tmp_path / "files", "hospital-d", tmp_path / "data")
    kits = provisioned.kit("server").parent
    before = _file_hashes(kits)
    kit = provisioned.add_site("hospital-d", files)
    after = _file_hashes(kits)
    assert {p: h for p, h in after.items() if p in before} == before  # every file of every kit, byte for byte
    assert sorted(set(after) - set(before)) == ["server/local/site_keys/hospital-d.pub"]
    assert kit.parent != kits and [p.name for p in kit.parent.iterdir()] == ["hospital-d"]  # only the new kit there
    assert provisioned.kit("hospital-d") == kit and provisioned.state["hospitals"] == [*HOSPITALS, "hospital-d"]
    client = json.loads((kit / "startup" / "fed_client.json").read_text())
    assert client["client"]["fqsn"] == "hospital-d" and client["servers"][0]["service"]["target"] == "localhost:18990"
    root_ca = (kits / "server" / "startup" / "rootCA.pem").read_bytes()
    assert (kit / "startup" / "rootCA.pem").read_bytes() == root_ca  # the server will accept its certificate
    cert = x509.load_pem_x509_certificate((kit / "startup" / "client.crt").read_bytes())
    assert cert.issuer == x509.load_pem_x509_certificate(root_ca).subject
    local = kit / "local"
    assert json.loads((local / "fedmed_site.json").read_text())["site_name"] == "hospital-d"
    assert (local / "privacy.json").read_text() == (files / "privacy.json").read_text()
    assert ts.context_from((local / "client_context.tenseal").read_bytes()).is_private()  # the federation's HE keys
    assert (local / "he_key_id.txt").read_text() == (kits / "hospital-a" / "local" / "he_key_id.txt").read_text()
    installed = signing.load_site_public_keys(kits / "server" / "local")
    assert installed["hospital-d"].fingerprint == signing.load_site_keys(local).public.fingerprint
    with pytest.raises(FileExistsError, match="'hospital-d' already exists"):
        provisioned.add_site("hospital-d", files)  # a second time
