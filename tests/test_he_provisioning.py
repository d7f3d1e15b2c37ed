"""HE keys made by a hospital's key custodian, not at provisioning: the real `nvflare provision` with fedmed's
builder puts only the custodian's secret-free server context into the server kit, and refuses a secret one."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmed.security import ckks
from fedmed.security.he_keys import install_client_context, make_key_set

REPO = Path(__file__).resolve().parents[1]
PROJECT = """\
api_version: 3
name: he_check
description: HE builder check
participants:
  - {{name: localhost, type: server, org: fedmed, fed_learn_port: 18002, admin_port: 18003}}
  - {{name: hospital-a, type: client, org: hospital_a}}
  - {{name: hospital-b, type: client, org: hospital_b}}
  - {{name: admin@fedmed.org, type: admin, org: fedmed, role: project_admin}}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args: {{template_file: master_template.yml}}
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args: {{config_folder: config}}
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: fedmed.flare.he_builder.FedMedHEBuilder
    args: {{server_context: {ctx}}}
  - path: nvflare.lighter.impl.signature.SignatureBuilder
"""


def _provision(tmp_path, ctx: Path):
    (tmp_path / "project.yml").write_text(PROJECT.format(ctx=ctx))
    cmd = [
        sys.executable,
        "-c",
        "import sys; from nvflare.cli import main; sys.exit(main())",
        "provision",
        "-p",
        str(tmp_path / "project.yml"),
        "-w",
        str(tmp_path / "ws"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)


def test_builder_installs_the_custodians_public_context_and_provisioning_makes_no_keys(tmp_path):
    keys = make_key_set(tmp_path / "custodian")
    proc = _provision(tmp_path, tmp_path / "custodian" / "server" / ckks.SERVER_CONTEXT_FILE)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kits = sorted((tmp_path / "ws" / "he_check").glob("prod_*"))[-1]
    server = ckks.load_server_context(kits / "localhost" / "startup" / ckks.SERVER_CONTEXT_FILE)
    assert server.key_id == keys.key_id
    assert not [p for p in (tmp_path / "ws").rglob("*") if p.name == ckks.CLIENT_CONTEXT_FILE]
    # The hospitals' kits get the custodian's secret context at install, and the two work together.
    for site in ("hospital-a", "hospital-b"):
        install_client_context(tmp_path / "custodian" / "hospitals" / ckks.CLIENT_CONTEXT_FILE, kits / site)
    a = ckks.load_client_context(kits / "hospital-a" / "local" / ckks.CLIENT_CONTEXT_FILE)
    assert a.key_id == server.key_id
    block = ckks.encrypt_layers({"w": np.array([[1.0, 2.0], [3.0, 4.0]])}, a)
    assert ckks.find_encrypted_problem(block.to_wire(), ("w",), {"w": (2, 2)}, server) is None
    summed = ckks.weighted_sum([block, block], [0.25, 0.25], server)
    b = ckks.load_client_context(kits / "hospital-b" / "local" / ckks.CLIENT_CONTEXT_FILE)
    assert abs(ckks.decrypt_layers(summed, b)["w"][1, 1] - 2.0) < 1e-3


def test_builder_refuses_a_context_with_the_secret_key(tmp_path):
    make_key_set(tmp_path / "custodian")
    proc = _provision(tmp_path, tmp_path / "custodian" / "hospitals" / ckks.CLIENT_CONTEXT_FILE)
    assert proc.returncode != 0
    assert "holds a CKKS secret key" in proc.stdout + proc.stderr


def test_key_set_is_never_overwritten_and_the_secret_is_private(tmp_path):
    make_key_set(tmp_path / "k")
    secret = tmp_path / "k" / "hospitals" / ckks.CLIENT_CONTEXT_FILE
    assert secret.stat().st_mode & 0o077 == 0
    before = secret.read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        make_key_set(tmp_path / "k")
    assert secret.read_bytes() == before
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "he_keys.py"), "make", "--out", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "never overwritten" in out.stderr
