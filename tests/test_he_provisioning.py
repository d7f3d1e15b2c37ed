"""fedmed's HE provisioning builder with the real `nvflare provision`: server kit public, hospital kits private,
and the key id that ties them."""

import subprocess
import sys
from pathlib import Path

from fedmed.crypto import ckks

REPO = Path(__file__).resolve().parents[1]
PROJECT = """\
api_version: 3
name: he_check
description: HE builder check
participants:
  - {name: localhost, type: server, org: fedmed, fed_learn_port: 18002, admin_port: 18003}
  - {name: hospital-a, type: client, org: hospital_a}
  - {name: hospital-b, type: client, org: hospital_b}
  - {name: admin@fedmed.org, type: admin, org: fedmed, role: project_admin}
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args: {template_file: master_template.yml}
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args: {config_folder: config}
  - path: nvflare.lighter.impl.cert.CertBuilder
  - path: fedmed.flare.he_builder.FedMedHEBuilder
    args: {poly_modulus_degree: 8192, coeff_mod_bit_sizes: [60, 40, 40], scale_bits: 40}
"""


def test_provisioned_kits_carry_public_server_context_and_private_hospital_keys(tmp_path):
    (tmp_path / "project.yml").write_text(PROJECT)

    cmd = [sys.executable, "-c", "import sys; from nvflare.cli import main; sys.exit(main())", "provision",
           "-p", str(tmp_path / "project.yml"), "-w", str(tmp_path / "ws")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kits = sorted((tmp_path / "ws" / "he_check").glob("prod_*"))[-1]
    server = ckks.load_server_context(kits / "localhost" / "startup" / ckks.SERVER_CONTEXT_FILE)
    assert server.context.is_private() is False
    assert not list((kits / "localhost").rglob(ckks.CLIENT_CONTEXT_FILE))
    for site in ("hospital-a", "hospital-b"):
        hospital = ckks.load_client_context(kits / site / "startup" / ckks.CLIENT_CONTEXT_FILE)
        assert hospital.key_id == server.key_id  # written by the builder from the server's context
        assert not (kits / site / "startup" / ckks.SERVER_CONTEXT_FILE).exists()
    # The two kits' keys work together: a hospital's ciphertext passes the server's checks and decrypts.
    a = ckks.load_client_context(kits / "hospital-a" / "startup" / ckks.CLIENT_CONTEXT_FILE)
    block = ckks.encrypt_layers({"w": [[1.0, 2.0], [3.0, 4.0]]}, a)
    assert ckks.find_encrypted_problem(block.to_wire(), ("w",), {"w": (2, 2)}, server) is None
    summed = ckks.weighted_sum([block, block], [0.25, 0.25], server)
    b = ckks.load_client_context(kits / "hospital-b" / "startup" / ckks.CLIENT_CONTEXT_FILE)
    assert abs(ckks.decrypt_layers(summed, b)["w"][1, 1] - 2.0) < 1e-3
