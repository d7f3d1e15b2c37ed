"""Provisioning builder that places a key custodian's *secret-free* CKKS server context in the server kit.

Provisioning no longer makes keys: NVFlare's HEBuilder generates the whole key set on the provisioning machine (the
server operator's) and copies the secret key into every kit, so the operator could read every head. Keys are made at
a hospital instead (scripts/he_keys.py, fedmed.security.he_keys) and the secret context reaches the hospitals out of
band. This builder is optional: it only puts the custodian's server context into the server kit before
SignatureBuilder, so that file is signed with the kit; `site_configs/install.sh <server kit> server --he-context`
does the same after provisioning. It refuses a context that holds a secret key. In project.yml:

    - path: fedmed.flare.he_builder.FedMedHEBuilder
      args: {server_context: /path/from/custodian/server/server_context.tenseal}
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.lighter.spec import Builder, Project, ProvisionContext

from fedmed.security.ckks import SERVER_CONTEXT_FILE, load_server_context


class FedMedHEBuilder(Builder):
    def __init__(self, server_context: str):
        """Args:
        server_context: the key custodian's server/server_context.tenseal (no secret key; checked).
        """
        super().__init__()
        if not server_context:
            raise ValueError(
                "FedMedHEBuilder needs server_context: the key custodian's server context "
                "(scripts/he_keys.py make); provisioning does not create keys"
            )
        self.server_context = server_context

    def build(self, project: Project, ctx: ProvisionContext):
        loaded = load_server_context(Path(self.server_context))  # PermissionError if it holds a secret key
        server = project.get_server()
        if server is None:
            raise ValueError("project.yml has no server to install the HE server context into")
        with open(os.path.join(ctx.get_kit_dir(server), SERVER_CONTEXT_FILE), "wb") as f:
            f.write(Path(self.server_context).read_bytes())
        ctx.info(f"installed HE server context (key set {loaded.key_id[:12]}, no secret key) into the server kit")
