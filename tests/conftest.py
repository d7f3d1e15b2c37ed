from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_hospitals(tmp_path_factory):
    """Three small synthetic hospitals + global test set, generated once per test session."""
    from dataclasses import replace

    from fedmed.data.synthetic import DEFAULT_HOSPITALS, generate_hospitals

    root = tmp_path_factory.mktemp("hospitals")
    specs = [replace(h, num_images=n) for h, n in zip(DEFAULT_HOSPITALS, (16, 12, 14))]
    generate_hospitals(root, specs, num_test=16, seed=7, size=96)
    return root


@pytest.fixture(scope="session")
def tiny_brain_hospitals(tmp_path_factory):
    """Three small synthetic brain MR hospitals + global test set (4 tumour classes), generated once per session."""
    from dataclasses import replace

    from fedmed.data.synthetic import generate_hospitals
    from fedmed.data.synthetic_mri import BRAIN_MRI_FAMILY

    root = tmp_path_factory.mktemp("brain_hospitals")
    specs = [replace(h, num_images=n) for h, n in zip(BRAIN_MRI_FAMILY.hospitals, (14, 12, 14))]
    generate_hospitals(root, specs, num_test=16, seed=7, size=64, family=BRAIN_MRI_FAMILY)
    return root


TASK_HOSPITALS = {"chest_xray14": "tiny_hospitals", "brain_mri": "tiny_brain_hospitals"}


def _redteam_hospitals(tmp_path_factory, n_honest: int):
    """The red team's tiny hospitals (fedmed.sim.redteam.make_sites: n_honest honest ones and the hostile one, 12
    images each, 32 px, a test set of 16): (train, test)."""
    from fedmed.sim import redteam

    root = tmp_path_factory.mktemp(f"redteam{n_honest + 1}")
    names = redteam.make_sites(root, n_honest, 12, seed=3, num_test=16, size=64)
    train, test, _ = redteam.load_sites(root, names, 32)
    return train, test


@pytest.fixture(scope="module")
def redteam_hospitals(tmp_path_factory):
    """Four hospitals, one hostile: tests/test_redteam.py's single-attacker rows."""
    return _redteam_hospitals(tmp_path_factory, 3)


@pytest.fixture(scope="module")
def redteam_hospitals5(tmp_path_factory):
    """Five hospitals, up to two colluding: tests/test_redteam_collusion.py's rows."""
    return _redteam_hospitals(tmp_path_factory, 4)


@pytest.fixture(params=sorted(TASK_HOSPITALS))
def task_data(request):
    """(TaskSpec, root of its tiny hospitals): a test using it runs once per task, through the same code paths."""
    from fedmed.job.tasks import get_task

    return get_task(request.param), request.getfixturevalue(TASK_HOSPITALS[request.param])


@pytest.fixture(autouse=True)
def _no_audit_key_from_the_shell(monkeypatch):
    """Tests choose their audit key themselves: none leaks in from the developer's environment."""
    from fedmed.store.audit import ENV_AUDIT_HEADS, ENV_AUDIT_KEY, ENV_AUDIT_KEY_FILE

    for name in (ENV_AUDIT_KEY, ENV_AUDIT_KEY_FILE, ENV_AUDIT_HEADS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _inference_record_in_tmp(tmp_path_factory, monkeypatch):
    """fedmed-infer's default record folder (fedmed.inference.record) is the user's state dir: tests keep theirs in
    a temporary one, never in the developer's home."""
    monkeypatch.delenv("FEDMED_INFER_RECORD_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg_state")))


@pytest.fixture
def pg_audit_key(tmp_path, monkeypatch):
    """A PostgreSQL database has no folder of its own for the audit key: give it a server kit's local/audit_key
    (made 0600 on first write; the heads file goes next to that local/) through the environment."""
    from fedmed.store.audit import ENV_AUDIT_KEY_FILE

    path = tmp_path / "server-kit" / "local" / "audit_key"
    monkeypatch.setenv(ENV_AUDIT_KEY_FILE, str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def pg_cluster():
    """A real PostgreSQL server for the session. CI sets FEDMED_REQUIRE_POSTGRES=1 so a missing server fails."""
    import os

    from pgcluster import PgCluster, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("FEDMED_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL server binaries not found (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries not installed")
    cluster = PgCluster(bin_dir)
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request, tmp_path):
    """The repository contract runs on both engines: SQLite file, and a fresh database on the real server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fedmed.db'}"  # audit key: the default, tmp_path/local/audit_key
    request.getfixturevalue("pg_audit_key")
    return request.getfixturevalue("pg_cluster").create_database()


@pytest.fixture
def audit_key_file(db_url, tmp_path):
    """Where the db_url fixture's record keeps its audit key."""
    import os

    from fedmed.store.audit import ENV_AUDIT_KEY_FILE

    return Path(os.environ[ENV_AUDIT_KEY_FILE]) if db_url.startswith("postgresql") else tmp_path / "local" / "audit_key"


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory):
    """Real signing key pairs (ML-DSA-65 + Ed25519) of hospital-a and the server, as install makes them."""
    from fedmed.security import signing

    root = tmp_path_factory.mktemp("signing-keys")
    for site in ("hospital-a", "server"):
        signing.generate_site_keys(root / site, site)
    return {site: signing.load_site_keys(root / site) for site in ("hospital-a", "server")}


def over_the_wire(model):
    """An FLModel as the other side receives it: FLModel -> Shareable -> FOBS bytes and back."""
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils
    from nvflare.fuel.utils import fobs

    common_decomposers.register()
    return FLModelUtils.from_shareable(fobs.loads(fobs.dumps(FLModelUtils.to_shareable(model))))


@pytest.fixture(scope="session")
def orthanc():
    """A real Orthanc PACS with DICOMweb for the session. CI sets FEDMED_REQUIRE_ORTHANC=1 so a missing one fails."""
    import os

    from orthanc import OrthancServer, find_orthanc

    found = find_orthanc()
    if found is None:
        if os.environ.get("FEDMED_REQUIRE_ORTHANC") == "1":
            pytest.fail("Orthanc or its DICOMweb plugin not found (apt-get install orthanc orthanc-dicomweb)")
        pytest.skip("Orthanc with the DICOMweb plugin not installed")
    server = OrthancServer(*found)
    server.start()
    yield server
    server.destroy()
