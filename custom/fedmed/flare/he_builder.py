"""Provisioning builder: NVFlare's HEBuilder plus the key-set id fedmed uses to refuse foreign ciphertexts.

In project.yml, in place of nvflare.lighter.impl.he.HEBuilder:
    - path: fedmed.flare.he_builder.FedMedHEBuilder
      args: {poly_modulus_degree: 8192, coeff_mod_bit_sizes: [60, 40, 40], scale_bits: 40}
"""

from __future__ import annotations

import os

from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.impl.he import HEBuilder
from nvflare.lighter.spec import Project, ProvisionContext

from fedmed.crypto.ckks import CLIENT_CONTEXT_FILE, KEY_ID_FILE, SERVER_CONTEXT_FILE, key_id_of


class FedMedHEBuilder(HEBuilder):
    """Writes server_context.tenseal (no secret key) into the server kit and client_context.tenseal (secret key)
    into each hospital's kit, as HEBuilder does, then he_key_id.txt (sha256 of the server context) beside each
    client context so a hospital whose kit comes from another provisioning is refused with that reason."""

    def build(self, project: Project, ctx: ProvisionContext):
        if (ProvFileName.SERVER_CONTEXT_TENSEAL, ProvFileName.CLIENT_CONTEXT_TENSEAL) != (SERVER_CONTEXT_FILE,
                                                                                         CLIENT_CONTEXT_FILE):
            raise RuntimeError("NVFlare's HE context file names changed; update fedmed.crypto.ckks")
        super().build(project, ctx)
        server = project.get_server()
        if server is None:
            raise ValueError("project.yml has no server: the HE key id is derived from the server's context")
        with open(os.path.join(ctx.get_kit_dir(server), SERVER_CONTEXT_FILE), "rb") as f:
            key_id = key_id_of(f.read())
        for client in project.get_clients():
            with open(os.path.join(ctx.get_kit_dir(client), KEY_ID_FILE), "w") as f:
                f.write(key_id + "\n")
