"""Install a site's settings from site_configs/ into its provisioned NVFlare startup kit.

    fedmed-install-kit <kit_dir> <site> [--site-config FILE] [--db-url URL] [--he-context FILE]
    fedmed-install-kit --check <kit_dir> [<site>]     pre-flight check of an installed kit; writes nothing
    (site_configs/install.sh <kit_dir> <site> runs this with the project's .venv; so does
    `python scripts/install_kit.py`)

<kit_dir> is the participant folder written by `nvflare provision` (it holds startup/ and local/); <site> is
`server` or a hospital name (hospital-a, ...). Writes into <kit_dir>/local/:
    resources.json      NVFlare's default + site_configs/<site>/resources.json (fedmed allow-listed, own paths)
    authorization.json  site_configs/authorization.json (who may submit, manage, download jobs at this site)
    log_config.json     site_configs/<site>/log_config.json, else site_configs/log_config.json
    privacy.json        hospitals: site_configs/<site>/privacy.json (NVFlare privacy scopes)
    fedmed_site.json    hospitals: data location and format (validated; relative paths made absolute)
    fedmed.env          environment for the site's processes (the server's FEDMED_DB_URL, and with a --db-url that
                        is no SQLite file, FEDMED_AUDIT_KEY_FILE=<kit>/local/audit_key)
    audit_key           server, --db-url not a SQLite file (PostgreSQL): the run record's audit key (0600, made
                        once, never replaced); a SQLite record keeps its key in <database folder>/local/audit_key
    fedmed_signing.key  this site's signing keys (ML-DSA-65 + Ed25519, 0600), made once, never replaced
    fedmed_signing.pub  its public bundle: carry it to the other side (fedmed-signing-keys export / install-*)
    client_context.tenseal, he_key_id.txt   hospitals, with --he-context: the key custodian's secret context
and, for the server with --he-context, startup/server_context.tenseal (the custodian's secret-free context, where
fedmed's controller reads it; provisioning no longer makes keys: scripts/he_keys.py),
and <kit_dir>/start_fedmed.sh, which starts the site with this checkout's Python
(its venv, where fedmed is installed).
Nothing else under startup/ is touched.

--check (also run by start_fedmed.sh before NVFlare starts, and after every install): for a hospital, validates
local/fedmed_site.json (or $FEDMED_SITE_CONFIG), opens its labels and reads one labelled image; for the server,
names its run record and its audit key (exit 1 when a record that is no SQLite file has none). Then says which server address the site will dial. Exit 1, with one line saying what is
wrong, when the check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fedmed.job.constants import ENV_DB_URL, ENV_SITE_CONFIG
from fedmed.paths import SITE_CONFIGS
from fedmed.security import signing
from fedmed.security.he_keys import install_client_context, install_server_context  # noqa: E402
from fedmed.site.site_config import load_site_config
from fedmed.store import audit
from fedmed.store.urls import default_db_url

SERVER = "server"
FEDMED_ALLOW = "fedmed."
# Locates (without importing torch) the modules a site's job process loads.
FIND_MODULES = (
    "import importlib.util as u, sys; m = [n for n in ('nvflare', 'torch', 'fedmed.flare.executor') "
    "if u.find_spec(n) is None]; sys.exit(f'cannot find {m}' if m else 0)"
)
KIT_PLACEHOLDER = "{KIT}"
SITE_PID_FILE = "fedmed_site.pid"  # written by start_fedmed.sh --once; NVFlare's daemon writes pid.fl/daemon_pid.fl  # in resources.json overrides: replaced by the kit's absolute path

START_SCRIPT = """#!/usr/bin/env bash
# Written by site_configs/install.sh: start this NVFlare site with the Python that has fedmed installed.
#   ./start_fedmed.sh          NVFlare's start.sh (background daemon that restarts the site if it dies)
#   ./start_fedmed.sh --once   the site in the foreground, one process (systemd, scripts/federation.py)
set -euo pipefail
KIT="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export PATH={python_bin}:"$PATH"
if [[ -f "$KIT/local/fedmed.env" ]]; then set -a; . "$KIT/local/fedmed.env"; set +a; fi
# Pre-flight: the site's data paths, labels and one image (hospitals), before any job; FEDMED_SKIP_CHECK=1 skips.
if [[ "${{FEDMED_SKIP_CHECK:-}}" != 1 ]]; then
  python -m fedmed.cli.install_kit --check "$KIT" || {{
    echo "start_fedmed.sh: not started: fix the above in $KIT/local/ (install.sh --check re-checks)" >&2; exit 1; }}
fi
if [[ "${{1:-}}" == "--once" ]]; then
  echo $$ > "$KIT/{pid_file}"   # exec keeps this PID for NVFlare's process: fedmed-site stop finds it here
  exec "$KIT/startup/sub_start.sh" --once
fi
exec "$KIT/startup/start.sh" "$@"
"""


def kit_identity(kit: Path) -> tuple[str, str]:
    """('server', project) or ('client', site name) read from the kit's startup config."""
    startup = kit / "startup"
    if (startup / "fed_server.json").is_file():
        return SERVER, SERVER
    client_cfg = startup / "fed_client.json"
    if client_cfg.is_file():
        return "client", json.loads(client_cfg.read_text())["client"]["fqsn"]
    raise ValueError(
        f"{kit} is not an NVFlare server or client startup kit (no startup/fed_server.json or startup/fed_client.json)"
    )


def merge_resources(default: dict, override: dict, kit: Path) -> dict:
    """NVFlare's provisioned resources + our overrides: class_allow_list is extended (never narrowed), components
    with the same id are replaced, each "servers" entry updates the provisioned one's keys, other top-level keys
    are replaced; {KIT} in strings becomes the kit path."""
    override = json.loads(json.dumps(override).replace(KIT_PLACEHOLDER, str(kit.resolve())))
    merged = dict(default)
    for key, value in override.items():
        if key == "class_allow_list":
            merged[key] = sorted(set(default.get(key, [])) | set(value))
        elif key == "servers":  # per-server settings (heart_beat_timeout, ...) update NVFlare's, by position
            base = default.get(key, [])
            merged[key] = [{**(base[i] if i < len(base) else {}), **v} for i, v in enumerate(value)] + base[
                len(value) :
            ]
        elif key == "components":
            by_id = {c["id"]: c for c in default.get("components", [])}
            by_id.update({c["id"]: c for c in value})
            merged[key] = list(by_id.values())
        else:
            merged[key] = value
    merged["class_allow_list"] = sorted(set(merged.get("class_allow_list", [])) | {FEDMED_ALLOW})
    return merged


def site_file(site: str, name: str, shared: bool = False, site_dir: Path | None = None) -> Path | None:
    """site_dir/<name> (default site_configs/<site>/), else with shared the project-wide site_configs/<name>."""
    own = Path(site_dir or SITE_CONFIGS / site) / name
    if own.is_file():
        return own
    common = SITE_CONFIGS / name
    return common if shared and common.is_file() else None


def install_site_config(source: Path, site: str, dest: Path) -> list[str]:
    """Validate the hospital's fedmed_site.json and write it with absolute data paths; returns warnings."""
    cfg = load_site_config(source)  # raises naming the file and the bad key
    if cfg.site_name != site:
        raise ValueError(f"{source} is for site {cfg.site_name!r}, not {site!r}")
    if cfg.privacy is None and not cfg.synthetic_rehearsal:
        # A job can name any scope in privacy.json; the site's own policy is what no job can loosen.
        raise ValueError(
            f"{source} has no 'privacy' policy: a hospital's own config must set its DP ceiling; only "
            "synthetic rehearsal data (\"synthetic_rehearsal\": true) may run without one"
        )
    raw = json.loads(source.read_text())
    raw["data"]["root"] = str(cfg.data.root)
    if cfg.data.labels_csv is not None:
        raw["data"]["labels_csv"] = str(cfg.data.labels_csv)
    dest.write_text(json.dumps(raw, indent=2) + "\n")
    return []  # the data itself is checked by check_kit once everything is installed


def write_env(path: Path, values: dict) -> None:
    lines = ["# Environment of this site's NVFlare processes (sourced by start_fedmed.sh)."]
    lines += [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")


def read_env(path: Path) -> dict:
    values = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                values[k.strip()] = shlex.split(v)[0] if v.strip() else ""
    return values


def check_hospital_files(site: str, site_dir: Path | None = None, site_config: Path | None = None) -> Path:
    """Validate a hospital's privacy.json and fedmed_site.json (in site_dir, default site_configs/<site>/; or
    site_config) before anything is written; returns the privacy.json path. Raises naming the file and the fault."""
    privacy = site_file(site, "privacy.json", site_dir=site_dir)
    if privacy is None:
        where = site_dir or f"site_configs/{site}"
        raise ValueError(f"{where}/privacy.json is missing: every hospital states its privacy scopes")
    policy = json.loads(privacy.read_text())
    if policy.get("default_scope") not in {s.get("name") for s in policy.get("scopes", [])}:
        raise ValueError(f"{privacy}: default_scope {policy.get('default_scope')!r} is not one of its scopes")
    source = Path(site_config or Path(site_dir or SITE_CONFIGS / site) / "fedmed_site.json")
    cfg = load_site_config(source)  # raises naming the file and the bad key
    if cfg.site_name != site:
        raise ValueError(f"{source} is for site {cfg.site_name!r}, not {site!r}")
    return privacy


def install(
    kit: Path,
    site: str,
    site_config: Path | None = None,
    db_url: str | None = None,
    python_bin: Path | None = None,
    check_import: bool = True,
    he_context: Path | None = None,
    site_dir: Path | None = None,
) -> list[str]:
    """Install site_configs/<site> (or site_dir: a folder of the same files) into the kit. Returns warnings (e.g.
    data not mounted yet); raises on errors."""
    kit = Path(kit).resolve()
    kind, name = kit_identity(kit)
    if name != site:
        raise ValueError(f"{kit} is the startup kit of {name!r}, not {site!r}")
    site_dir = Path(site_dir or SITE_CONFIGS / site)
    if not site_dir.is_dir():
        raise ValueError(
            f"no {site_dir}/ folder; known in site_configs/: "
            f"{sorted(p.name for p in SITE_CONFIGS.iterdir() if p.is_dir())}"
        )
    local = kit / "local"
    warnings = []
    if he_context is not None:  # first: a swapped context (secret to the server, public to a hospital) stops here
        (install_server_context if kind == SERVER else install_client_context)(Path(he_context), kit)
    default = json.loads((local / "resources.json.default").read_text())
    override_file = site_file(site, "resources.json", site_dir=site_dir)
    override = json.loads(override_file.read_text()) if override_file else {}
    (local / "resources.json").write_text(json.dumps(merge_resources(default, override, kit), indent=2) + "\n")
    (local / "authorization.json").write_text((SITE_CONFIGS / "authorization.json").read_text())
    (local / "log_config.json").write_text(
        site_file(site, "log_config.json", shared=True, site_dir=site_dir).read_text()
    )
    env = read_env(site_dir / "fedmed.env")
    if kind == SERVER:
        if db_url:
            env[ENV_DB_URL] = db_url
        # Written out, never implied: the admin's tools read it from here, and the server logs it at start.
        env.setdefault(ENV_DB_URL, default_db_url(kit))
        install_audit_key(local, env)
    else:
        privacy = check_hospital_files(site, site_dir, site_config)
        (local / "privacy.json").write_text(privacy.read_text())
        warnings += install_site_config(
            Path(site_config or site_dir / "fedmed_site.json"), site, local / "fedmed_site.json"
        )
    write_env(local / "fedmed.env", env)
    if not (local / signing.PRIVATE_FILE).exists():  # a reinstall keeps the site's identity
        signing.generate_site_keys(local, site)
    python_bin = Path(python_bin or Path(sys.executable).parent)
    start = kit / "start_fedmed.sh"
    start.write_text(START_SCRIPT.format(python_bin=shlex.quote(str(python_bin)), pid_file=SITE_PID_FILE))
    start.chmod(0o755)
    if check_import:
        # The same environment the site will run in: fail here, not when the first job is deployed.
        probe = subprocess.run(
            [str(python_bin / "python"), "-c", FIND_MODULES], capture_output=True, text=True, timeout=120
        )
        if probe.returncode != 0:
            raise RuntimeError(
                f"fedmed is not importable with {python_bin}/python (run scripts/setup.sh, which installs "
                f"it there): {probe.stderr.strip()[-2000:]}"
            )
    if kind != SERVER:
        try:
            check_kit(kit)
        except (ValueError, FileNotFoundError, OSError) as e:
            warnings.append(f"{site}: pre-flight check failed (start_fedmed.sh will refuse to start until fixed): {e}")
    return warnings


def install_audit_key(local: Path, env: dict) -> None:
    """A record with no folder of its own (PostgreSQL) gets its audit key in the server kit's local/ (made once,
    0600, never replaced) and FEDMED_AUDIT_KEY_FILE naming it in env; a SQLite record keeps the key beside itself
    (<database folder>/local/audit_key, made at the server's first write). A key the env names already is kept."""
    if env.get(audit.ENV_AUDIT_KEY) or env.get(audit.ENV_AUDIT_KEY_FILE):
        return
    if audit.default_key_file(env[ENV_DB_URL]) is not None:
        return
    path = local / audit.KEY_FILE_NAME
    if not path.exists():
        audit.create_key_file(path)
    env[audit.ENV_AUDIT_KEY_FILE] = str(path)


def audit_key_location(url: str, env: dict) -> str:
    """Where the server's record keeps its audit key, as the server will resolve it; raises (one line naming the
    fix) when a record that is no SQLite file has none."""
    where = {**env, **{k: v for k, v in os.environ.items() if k in (audit.ENV_AUDIT_KEY, audit.ENV_AUDIT_KEY_FILE)}}
    if where.get(audit.ENV_AUDIT_KEY):
        return f"${audit.ENV_AUDIT_KEY}"
    path = Path(where[audit.ENV_AUDIT_KEY_FILE]) if where.get(audit.ENV_AUDIT_KEY_FILE) else audit.default_key_file(url)
    if path is None:
        raise ValueError(audit.missing_key_message(url))
    if where.get(audit.ENV_AUDIT_KEY_FILE) and not path.is_file():
        raise ValueError(f"audit key file {path} ({audit.ENV_AUDIT_KEY_FILE}) does not exist")
    return str(path) + ("" if path.is_file() else " (made when the server first opens the record)")


def server_address(kit: Path) -> str:
    """host:port the site dials (a hospital) or listens on (the server), from its signed startup config."""
    kind, _ = kit_identity(kit)
    name = "fed_server.json" if kind == SERVER else "fed_client.json"
    servers = json.loads((kit / "startup" / name).read_text()).get("servers") or [{}]
    return str(servers[0].get("service", {}).get("target", "?"))


def installed_site_config(kit: Path) -> Path:
    """Where a hospital's site reads its settings: $FEDMED_SITE_CONFIG, else <kit>/local/fedmed_site.json."""
    env = os.environ.get(ENV_SITE_CONFIG)
    return Path(env) if env else kit / "local" / "fedmed_site.json"


def check_kit(kit: Path) -> list[str]:
    """The pre-flight check of an installed kit; returns what it found, one line each; raises naming the problem."""
    from fedmed.data.preflight import check_site_data

    kit = Path(kit).resolve()
    kind, site = kit_identity(kit)
    if kind == SERVER:
        env = read_env(kit / "local" / "fedmed.env")
        url = os.environ.get(ENV_DB_URL) or env.get(ENV_DB_URL) or default_db_url(kit)
        safe = url.split("@")[-1] if "@" in url else url  # never print a password
        return [
            f"server: run record {safe}",
            f"server: audit key {audit_key_location(url, env)}",
            f"server: listening for hospitals and admins at {server_address(kit)}",
        ]
    path = installed_site_config(kit)
    cfg = load_site_config(path)  # raises naming the file and the bad key (with the nearest valid one)
    if cfg.site_name != site:
        raise ValueError(f"{path} is for site {cfg.site_name!r}, but this kit is {site!r}'s")
    found = check_site_data(cfg)
    return [
        f"{site}: {path}: {found.labelled} labelled image(s) for task {found.task}; read {found.image} "
        f"({found.shape[0]}x{found.shape[1]})",
        f"{site}: waiting for the FL server at {server_address(kit)} (NVFlare retries until it answers)",
    ]


def exchange_signing_keys(server_kit: Path, hospital_kits: list) -> None:
    """What the operators do out of band, for kits on one machine (demo, tests): each hospital's public signing key
    into the server kit's local/site_keys/, the server's into each hospital kit's local/server_signing.pub."""
    server_pub = Path(server_kit) / "local" / signing.PUBLIC_FILE
    for kit in hospital_kits:
        _, site = kit_identity(Path(kit))
        signing.install_public_keys(
            Path(kit) / "local" / signing.PUBLIC_FILE, signing.site_key_path(Path(server_kit) / "local", site), site
        )
        signing.install_public_keys(server_pub, Path(kit) / "local" / signing.SERVER_KEY_FILE, SERVER)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kit_dir", type=Path, help="the participant's provisioned folder (holds startup/ and local/)")
    p.add_argument("site", nargs="?", help="server, hospital-a, hospital-b or hospital-c (with --check: optional)")
    p.add_argument("--check", action="store_true", help="only the pre-flight check of the installed kit")
    p.add_argument("--site-config", type=Path, help="fedmed_site.json to install instead of site_configs/<site>/")
    p.add_argument("--db-url", help=f"server only: {ENV_DB_URL} for the run record")
    p.add_argument(
        "--he-context",
        type=Path,
        help="the key custodian's (scripts/he_keys.py) server context for the "
        "server, its client context (with he_key_id.txt beside it) for a "
        "hospital",
    )
    a = p.parse_args(argv)
    if a.check:
        try:
            if a.site and kit_identity(a.kit_dir.resolve())[1] != a.site:
                raise ValueError(f"{a.kit_dir} is not the kit of {a.site!r}")
            for line in check_kit(a.kit_dir):
                print(line, flush=True)
        except (ValueError, FileNotFoundError, OSError) as e:
            print(f"pre-flight check failed: {e}", file=sys.stderr)
            return 1
        return 0
    if a.site is None:
        p.error("give the site (server, hospital-a, ...) to install")
    try:
        warnings = install(a.kit_dir, a.site, a.site_config, a.db_url, he_context=a.he_context)
    except (ValueError, FileNotFoundError, RuntimeError, PermissionError) as e:
        print(f"install failed: {e}", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(
        f"installed site_configs/{a.site} into {a.kit_dir.resolve()}; start the site with "
        f"{a.kit_dir.resolve() / 'start_fedmed.sh'}"
    )
    pub = signing.load_public_keys(a.kit_dir / "local" / signing.PUBLIC_FILE)
    print(
        f"signing key fingerprint {pub.fingerprint.hex()}; public bundle {a.kit_dir.resolve() / 'local' / signing.PUBLIC_FILE}"
        f" (install it with fedmed-signing-keys {'install-server' if a.site == SERVER else 'install-site'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
