"""A whole fedmed federation on one machine: the FL server and N hospitals as separate processes on 127.0.0.1.

    fedmed-federation provision --workspace runs/federation [--port 8102] [--db-url URL] [--site-configs DIR]
                                [--he-keys DIR] [--force]
    fedmed-federation start  --workspace runs/federation [--sites hospital-a,...] [--timeout 120]
    fedmed-federation status --workspace runs/federation
    fedmed-federation stop   --workspace runs/federation
    fedmed-federation stop-site NAME --workspace runs/federation      (one site; `start --sites NAME` restarts it)
    fedmed-federation add-site NAME --workspace runs/federation [--config-dir DIR] [--org ORG] [--he-keys DIR]
(or `python scripts/federation.py ...`, the same command)

provision: `nvflare provision` of provision/project.yml (with --port replacing the server's port, so parallel
federations don't collide) into <workspace>/provision, then site_configs/install.sh for the server and every
hospital (--site-configs DIR takes each hospital's fedmed_site.json from DIR/<site>/ instead of site_configs/).
An already provisioned workspace is refused, listing what re-provisioning would replace or delete (root CA and
every kit, the kits' signing keys, HE contexts and privacy ledgers, the server's job store, downloaded results),
unless --force. The run record defaults to SQLite <workspace>/fedmed.db, outside what --force replaces.
start: each site's start_fedmed.sh --once as its own process (sites already running are left alone), PIDs in
<workspace>/pids.json, console output in <kit>/console.log; waits, polling the admin API, until every hospital is
registered (or stops what it started and fails at --timeout).
stop: SIGTERM to each site's process and its job processes, SIGKILL after a grace period, then checks that
every PID is gone.
add-site: a new hospital for a provisioned (possibly running) federation: `nvflare provision --add_client` with the
workspace's saved project.yml, which reuses the root CA and certificates in its provisioning state and writes the
next prod_NN folder (fedmed keeps only the new kit there: the others' kits stay those already handed out), then
installs the hospital's files (--config-dir, default site_configs/NAME/: fedmed_site.json and privacy.json, as for
the others), the federation's HE client context when the server has one, and exchanges signing keys (its public key
into the server kit's local/site_keys/, which the server reads at each job's start). No other kit file changes and
the running server is not touched; the hospital trains from the next job that names it (`start --sites NAME`
starts it). Refused, before anything is written, for a name that exists or is not a valid site name, and for a
workspace that was never provisioned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fedmed.cli.install_kit import SERVER, check_hospital_files, exchange_signing_keys, install
from fedmed.paths import PROJECT_YML, RUNS, SITE_CONFIGS
from fedmed.store.urls import default_db_url

PROJECT_ADMIN = "admin@fedmed.org"
STATE_FILE = "federation.json"
PIDS_FILE = "pids.json"
SAVED_PROJECT = "project.yml"  # under <workspace>/provision: what was provisioned, port included; add-site reuses it
# Stricter than NVFlare's client pattern ([A-Za-z0-9-_], whose "9-_" is a character range that lets in ':', '@',
# '[', ...): the name becomes a folder, a DB key and a certificate subject, and must not read as an option.
SITE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$")


def nvflare_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """NVFlare's own `nvflare` CLI, run with this interpreter (the venv's console script may point elsewhere; and
    project.yml names fedmed's HE builder, so the provisioning process must import the installed fedmed)."""
    code = "import sys; from nvflare.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def _project_with_port(project: dict, port: int | None) -> dict:
    if port is None:
        return project
    if not 1024 <= port <= 65535:
        raise ValueError(f"--port must be in 1024..65535, got {port}")
    for p in project["participants"]:
        if p["type"] == "server":
            p["fed_learn_port"] = p["admin_port"] = port
    return project


class Federation:
    """Provisioned kits and running processes of one federation, kept under one workspace folder."""

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace).resolve()

    # --- provisioning --------------------------------------------------------------------------------------------

    @property
    def state(self) -> dict:
        path = self.workspace / STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `fedmed-federation provision --workspace {self.workspace}`")
        return json.loads(path.read_text())

    def kit(self, name: str) -> Path:
        state = self.state
        added = state.get("added_kits", {})  # hospitals added later live in their own prod_NN folder
        return Path(added[name]) if name in added else Path(state["kits"]) / name

    @property
    def hospitals(self) -> list[str]:
        return list(self.state["hospitals"])

    @property
    def admins(self) -> dict:
        return dict(self.state["admins"])

    def db_url(self) -> str | None:
        """The server's FEDMED_DB_URL as installed in its kit (local/fedmed.env)."""
        from fedmed.cli.install_kit import read_env
        from fedmed.job.constants import ENV_DB_URL

        return read_env(self.kit(SERVER) / "local" / "fedmed.env").get(ENV_DB_URL)

    def existing_provisioning(self) -> list[str]:
        """What re-provisioning this workspace would replace or delete, one line each; [] for a fresh workspace."""
        out = self.workspace / "provision"
        if not out.exists() and not (self.workspace / STATE_FILE).exists():
            return []
        lines = [f"the root CA and every certificate under {out} (kits already handed out stop matching the server)"]
        kits = sorted(p for p in out.glob("*/prod_*/*") if (p / "startup").is_dir())
        if kits:
            lines.append(f"{len(kits)} startup kits: {', '.join(k.name for k in kits)}")

        def found(pattern: str) -> list[Path]:
            return sorted(p for k in kits for p in k.glob(pattern) if p.is_file())

        for pattern, what in (
            ("local/" + "fedmed_signing.key", "site signing key(s)"),
            ("*/*.tenseal", "installed HE context(s) (CKKS keys)"),
            ("local/privacy_ledger.jsonl", "hospital privacy ledger(s) (lifetime epsilon spent)"),
            ("local/privacy_ledger.key", "hospital privacy ledger key(s) (without one its ledger cannot be checked)"),
            ("fedmed.db", "run record database(s) inside a kit"),
        ):
            hits = found(pattern)
            if hits:
                lines.append(f"{len(hits)} {what}: {', '.join(str(p.relative_to(self.workspace)) for p in hits)}")
        jobs = [p for k in kits for p in (k / "state" / "jobs-storage").glob("*") if p.is_dir()]
        if jobs:
            lines.append(f"the server's job store: {len(jobs)} job(s) with their models and logs")
        results = [p for k in kits for p in (k / "transfer").glob("*")]
        if results:
            lines.append(f"{len(results)} downloaded job result(s) in the admin kits' transfer/ folders")
        return lines

    def provision(
        self,
        project_yml: Path = PROJECT_YML,
        port: int | None = None,
        db_url: str | None = None,
        site_configs: Path | None = None,
        install_sites: bool = True,
        he_keys: Path | None = None,
        force: bool = False,
    ) -> dict:
        """nvflare provision + install every site. Returns the state written to <workspace>/federation.json.
        he_keys: a key custodian's folder (scripts/he_keys.py make --out): its server/ context goes to the server
        kit, its hospitals/ context to each hospital kit (on one machine, the out-of-band hand-over is a copy).
        db_url: the server's FEDMED_DB_URL; default SQLite <workspace>/fedmed.db (kept by a forced re-provision).
        An existing provisioning is refused (FileExistsError listing what would go) unless force; a running
        federation is refused whatever force says."""
        project = _project_with_port(yaml.safe_load(Path(project_yml).read_text()), port)
        out = self.workspace / "provision"
        existing = self.existing_provisioning()
        if existing:
            running = self.running()
            if running:
                raise RuntimeError(
                    f"{self.workspace} has running sites {sorted(running)}: run `fedmed-federation "
                    f"stop --workspace {self.workspace}` before re-provisioning"
                )
            if not force:
                raise FileExistsError(
                    f"{self.workspace} is already provisioned; provisioning again would replace or delete:\n  - "
                    + "\n  - ".join(existing)
                    + f"\nThe run record ({db_url or default_db_url(self.workspace)}) is kept. Add --force to do it, "
                    "or give another --workspace."
                )
        if out.exists():
            shutil.rmtree(out)
        self.workspace.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            yml = Path(tmp) / "project.yml"
            yml.write_text(yaml.safe_dump(project, sort_keys=False))
            t0 = time.monotonic()
            proc = nvflare_cli("provision", "-p", str(yml), "-w", str(out))
        if proc.returncode != 0:
            raise RuntimeError(
                f"nvflare provision failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        kits = out / project["name"] / "prod_00"
        (out / SAVED_PROJECT).write_text(yaml.safe_dump(project, sort_keys=False))
        server = next(p for p in project["participants"] if p["type"] == "server")
        state = {
            "kits": str(kits),
            "port": server["fed_learn_port"],
            "hospitals": [p["name"] for p in project["participants"] if p["type"] == "client"],
            "admins": {p["name"]: p["role"] for p in project["participants"] if p["type"] == "admin"},
            "provision_seconds": round(time.monotonic() - t0, 2),
            "he_keys": str(Path(he_keys).resolve()) if he_keys else None,
        }
        (self.workspace / STATE_FILE).write_text(json.dumps(state, indent=2))
        if install_sites:
            server_ctx = Path(he_keys) / "server" / "server_context.tenseal" if he_keys else None
            client_ctx = Path(he_keys) / "hospitals" / "client_context.tenseal" if he_keys else None
            install(kits / SERVER, SERVER, db_url=db_url or default_db_url(self.workspace), he_context=server_ctx)
            for site in state["hospitals"]:
                custom = Path(site_configs) / site / "fedmed_site.json" if site_configs else None
                install(kits / site, site, site_config=custom, check_import=False, he_context=client_ctx)
            exchange_signing_keys(kits / SERVER, [kits / site for site in state["hospitals"]])
        return state

    def _saved_project(self, state: dict) -> dict:
        """The project as provisioned (port included). A workspace provisioned before it was saved: project.yml with
        the recorded port, if its hospitals are the recorded ones."""
        saved = self.workspace / "provision" / SAVED_PROJECT
        if saved.is_file():
            return yaml.safe_load(saved.read_text())
        project = _project_with_port(yaml.safe_load(PROJECT_YML.read_text()), state["port"])
        clients = [p["name"] for p in project["participants"] if p["type"] == "client"]
        if clients != state["hospitals"][: len(clients)] or len(clients) != len(state["hospitals"]):
            raise RuntimeError(
                f"{self.workspace / 'provision'} has no {SAVED_PROJECT} and {PROJECT_YML} names other hospitals "
                f"({clients}) than were provisioned ({state['hospitals']}): cannot add to it"
            )
        return project

    def check_new_site(self, name: str, config_dir: Path | None = None, he_keys: Path | None = None) -> dict:
        """Everything add_site needs, checked before anything is written. Returns {"config_dir": the hospital's
        files, "he_context": the HE client context or None, "project": the project as provisioned}; raises
        ValueError / FileNotFoundError / FileExistsError naming the fault."""
        if not (self.workspace / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"{self.workspace} was never provisioned (no {STATE_FILE}): run `fedmed-federation provision "
                f"--workspace {self.workspace}` first"
            )
        state = self.state
        if not isinstance(name, str) or not SITE_NAME.match(name):
            raise ValueError(
                f"invalid site name {name!r}: use letters, digits, '-' and '_' (at most 63, starting and ending "
                "with a letter or digit), e.g. hospital-d"
            )
        project = self._saved_project(state)
        taken = {p["name"] for p in project["participants"]} | set(state["hospitals"]) | {SERVER}
        if name in taken or name.lower() in {t.lower() for t in taken}:
            raise FileExistsError(f"{name!r} already exists in this federation (participants: {sorted(taken)})")
        server_kit = self.kit(SERVER)
        from fedmed.security import signing

        if signing.site_key_path(server_kit / "local", name).exists():
            raise FileExistsError(
                f"the server kit already holds a signing key for {name!r} "
                f"({signing.site_key_path(server_kit / 'local', name)}): remove it first if it is stale"
            )
        config_dir = Path(config_dir or SITE_CONFIGS / name)
        if not config_dir.is_dir():
            raise FileNotFoundError(
                f"no site files for {name!r} at {config_dir}: give --config-dir DIR holding its fedmed_site.json and "
                f"privacy.json (or add site_configs/{name}/ as for the other hospitals)"
            )
        check_hospital_files(name, config_dir)
        client_ctx = None
        server_ctx = server_kit / "startup" / "server_context.tenseal"
        if server_ctx.is_file():  # the federation runs HE: the newcomer needs the hospitals' key set
            from fedmed.security.he_keys import load_client_context, load_server_context

            folder = he_keys or state.get("he_keys")
            if not folder:
                raise FileNotFoundError(
                    f"the federation uses HE ({server_ctx} is installed) but no key custodian's folder is known: "
                    "give --he-keys DIR (scripts/he_keys.py make --out DIR)"
                )
            client_ctx = Path(folder) / "hospitals" / "client_context.tenseal"
            theirs, ours = load_client_context(client_ctx).key_id, load_server_context(server_ctx).key_id
            if theirs != ours:
                raise ValueError(f"{client_ctx} is key set {theirs}, but the server's context is key set {ours}")
        return {"config_dir": config_dir, "he_context": client_ctx, "project": project}

    def add_site(
        self, name: str, config_dir: Path | None = None, org: str | None = None, he_keys: Path | None = None
    ) -> Path:
        """A new hospital kit from `nvflare provision --add_client` (same root CA), installed and its signing key
        given to the server kit; no other kit file is changed and no process is touched. Returns the new kit."""
        checked = self.check_new_site(name, config_dir, he_keys)
        org = org or name.replace("-", "_")
        if not re.match(r"^[A-Za-z0-9_]+$", org):
            raise ValueError(f"invalid org {org!r}: NVFlare allows only letters, digits and '_'")
        project, state = checked["project"], self.state
        out = self.workspace / "provision"
        prods = out / project["name"]
        before = {p.name for p in prods.glob("prod_*")}
        with tempfile.TemporaryDirectory() as tmp:
            yml, client = Path(tmp) / SAVED_PROJECT, Path(tmp) / "client.yml"
            yml.write_text(yaml.safe_dump(project, sort_keys=False))
            client.write_text(yaml.safe_dump({"name": name, "org": org}))
            # --force: only NVFlare's "workspace exists, continue?" prompt; it writes a new prod_NN, never an old one.
            proc = nvflare_cli("provision", "-p", str(yml), "-w", str(out), "--add_client", str(client), "--force")
        new = sorted({p.name for p in prods.glob("prod_*")} - before)
        if proc.returncode != 0 or len(new) != 1 or not (prods / new[0] / name).is_dir():
            for folder in new:
                shutil.rmtree(prods / folder)
            raise RuntimeError(
                f"nvflare provision --add_client failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        prod = prods / new[0]
        # NVFlare rewrites every participant's kit into the new prod_NN (same certificates, from its state). Only
        # the newcomer's is handed out: the copies would be a second "hospital-a kit" for someone to mix up.
        for other in prod.iterdir():
            if other.is_dir() and other.name != name:
                shutil.rmtree(other)
        kit = prod / name
        try:
            install(kit, name, check_import=False, he_context=checked["he_context"], site_dir=checked["config_dir"])
            exchange_signing_keys(self.kit(SERVER), [kit])
        except BaseException:
            shutil.rmtree(prod)
            raise
        project["participants"].append({"name": name, "type": "client", "org": org})
        (out / SAVED_PROJECT).write_text(yaml.safe_dump(project, sort_keys=False))
        state["hospitals"].append(name)
        state.setdefault("added_kits", {})[name] = str(kit)
        (self.workspace / STATE_FILE).write_text(json.dumps(state, indent=2))
        return kit

    # --- processes -----------------------------------------------------------------------------------------------

    def _pids(self) -> dict:
        path = self.workspace / PIDS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _save_pids(self, pids: dict) -> None:
        (self.workspace / PIDS_FILE).write_text(json.dumps(pids, indent=2))

    def start_site(self, name: str, kit: Path | None = None, env: dict | None = None) -> int:
        """Start one site (server or hospital) from its kit; returns its PID (also the process group id)."""
        kit = Path(kit or self.kit(name))
        script = kit / "start_fedmed.sh"
        if not script.is_file():
            raise FileNotFoundError(f"{script} missing: the kit was not installed (site_configs/install.sh)")
        pids = self._pids()
        if name in pids and _alive(pids[name]):
            raise RuntimeError(f"{name} is already running (pid {pids[name]})")
        with open(kit / "console.log", "ab") as log:
            proc = subprocess.Popen(
                ["bash", str(script), "--once"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=kit,
                env=dict(os.environ, **(env or {})),
                start_new_session=True,
            )  # detached from our terminal's signals
        pids[name] = proc.pid
        self._save_pids(pids)
        return proc.pid

    def stop_site(self, name: str, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
        """Signal the site's process and its job processes (NVFlare starts those in their own sessions, so they
        are found by parentage, before anything is killed); SIGKILL after grace seconds; raises if any survives."""
        pids = self._pids()
        pid = pids.get(name)
        if pid is None:
            return
        tree = [pid, *_descendants(pid)]
        for p in tree:
            _signal(p, sig)
        if not all(_wait_gone(p, grace) for p in tree) and sig != signal.SIGKILL:
            for p in tree:
                _signal(p, signal.SIGKILL)
        alive = [p for p in tree if not _wait_gone(p, 10)]
        if alive:
            raise RuntimeError(f"{name}: process(es) {alive} did not exit")
        pids.pop(name)
        self._save_pids(pids)

    def stop(self) -> list[str]:
        """Stop every recorded process, hospitals first; returns the names stopped."""
        names = sorted(self._pids(), key=lambda n: n == SERVER)
        errors = []
        for name in names:
            try:
                self.stop_site(name)
            except RuntimeError as e:
                errors.append(str(e))
        if errors:
            raise RuntimeError("; ".join(errors))
        return names

    def running(self) -> dict:
        return {name: pid for name, pid in self._pids().items() if _alive(pid)}

    # --- admin API -----------------------------------------------------------------------------------------------

    def session(self, user: str = PROJECT_ADMIN, timeout: float = 30.0):
        from fedmed.cli.admin_session import new_admin_session  # NVFlare's session, 1-2 s sooner

        return new_admin_session(self.kit(user), user, timeout)

    def connected_clients(self, user: str = PROJECT_ADMIN) -> list[str]:
        s = self.session(user)
        try:
            return sorted(c.name for c in s.get_system_info().client_info)
        finally:
            s.close()

    def wait_registered(self, sites: list[str], timeout: float, user: str = PROJECT_ADMIN) -> float:
        """Poll the admin API until every site is connected; returns seconds waited, raises at the deadline."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            # only the processes waited for: a hospital stopped earlier by other means is no reason to fail
            dead = [n for n, pid in self._pids().items() if n in {SERVER, *sites} and not _alive(pid)]
            if dead:
                raise RuntimeError(
                    f"{dead} exited during start-up; see {[str(self.kit(n) / 'console.log') for n in dead]}"
                )
            try:
                seen = self.connected_clients(user)
            except Exception:  # server not accepting admin logins yet
                seen = []
            if set(sites) <= set(seen):
                return time.monotonic() - t0
            time.sleep(1.0)
        raise TimeoutError(f"after {timeout:.0f}s only {seen} of {sites} are registered with the server")

    def start(self, sites: list[str] | None = None, timeout: float = 120.0, env: dict | None = None) -> float:
        """The server, then the hospitals, each unless it runs already (`start --sites hospital-d` on a running
        federation starts only hospital-d); returns seconds until all are registered. On failure stops what it
        started, never a site that was already running."""
        sites = self.hospitals if sites is None else sites
        unknown = sorted(set(sites) - set(self.hospitals))
        if unknown:
            raise ValueError(f"{unknown} are not hospitals of this federation ({self.hospitals})")
        started = []
        try:
            for name in [SERVER, *sites]:
                if name not in self.running():
                    self.start_site(name, env=env)
                    started.append(name)
            return self.wait_registered(sites, timeout)
        except BaseException:
            for name in reversed(started):
                self.stop_site(name)
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child not yet reaped) is not alive
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of pid, from /proc (children first found, then theirs)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent_of[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent_of.items() if pp in frontier and p not in found]
        found += children
        frontier = children
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return not _alive(pid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("provision", "start", "status", "stop", "stop-site", "add-site"):
        s = sub.add_parser(name)
        s.add_argument("--workspace", type=Path, default=RUNS / "federation")
        if name == "provision":
            s.add_argument("--project", type=Path, default=PROJECT_YML)
            s.add_argument("--port", type=int, help="server port (default: project.yml's)")
            s.add_argument(
                "--db-url",
                help="the server's FEDMED_DB_URL (default: SQLite <workspace>/fedmed.db). Its audit key: for SQLite "
                "sqlite:///W/fedmed.db, W/local/audit_key; otherwise (PostgreSQL) <server kit>/local/audit_key, made "
                "by the install",
            )
            s.add_argument(
                "--force",
                action="store_true",
                help="re-provision an existing workspace: new root CA and kits, job store and results deleted",
            )
            s.add_argument(
                "--site-configs",
                type=Path,
                help="folder with <site>/fedmed_site.json to install instead of site_configs/<site>/",
            )
            s.add_argument(
                "--he-keys",
                type=Path,
                help="a key custodian's folder (scripts/he_keys.py make --out): installs its contexts",
            )
        if name == "stop-site":
            s.add_argument("name", help="server or a hospital")
        if name == "add-site":
            s.add_argument("name", help="the new hospital's site name, e.g. hospital-d")
            s.add_argument(
                "--config-dir",
                type=Path,
                help="folder with its fedmed_site.json and privacy.json (default site_configs/NAME/)",
            )
            s.add_argument("--org", help="its NVFlare org (letters, digits, '_'; default NAME with '_' for '-')")
            s.add_argument(
                "--he-keys",
                type=Path,
                help="the key custodian's folder, when the federation uses HE (default: the one given at provision)",
            )
        if name == "start":
            s.add_argument("--sites", help="comma-separated hospitals to start (default: all)")
            s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for registration")
    a = p.parse_args(argv)
    fed = Federation(a.workspace)
    if a.cmd not in ("provision", "add-site"):
        try:
            fed.state  # noqa: B018 -- every other command needs a provisioned workspace: say so, not "none"
        except FileNotFoundError:
            print(
                f"fedmed-federation {a.cmd}: {fed.workspace} is not a provisioned federation (no {STATE_FILE}): run "
                f"`fedmed-federation provision --workspace {fed.workspace}` first",
                file=sys.stderr,
            )
            return 2
    if a.cmd == "provision":
        try:
            state = fed.provision(a.project, a.port, a.db_url, a.site_configs, he_keys=a.he_keys, force=a.force)
        except (FileExistsError, RuntimeError, ValueError, FileNotFoundError) as e:
            print(f"provision refused: {e}", file=sys.stderr)
            return 2
        print(
            f"provisioned in {state['provision_seconds']}s: kits in {state['kits']}, server port {state['port']}; "
            f"run record {fed.db_url()}"
        )
    elif a.cmd == "add-site":
        try:
            kit = fed.add_site(a.name, a.config_dir, a.org, a.he_keys)
        except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as e:
            print(f"add-site refused: {e}", file=sys.stderr)
            return 2
        print(
            f"added {a.name}: kit {kit} (hand it to the hospital's IT); its public signing key is in the server kit's "
            f"local/site_keys/. Start it with `fedmed-federation start --sites {a.name}` (or its start_fedmed.sh); "
            "it trains from the next job that names it."
        )
    elif a.cmd == "start":
        sites = [s for s in a.sites.split(",") if s] if a.sites else None
        try:
            waited = fed.start(sites, a.timeout)
        except ValueError as e:
            print(f"start refused: {e}", file=sys.stderr)
            return 2
        except (RuntimeError, TimeoutError) as e:  # a site died at start-up or never registered: what start stopped
            print(f"start failed: {e}", file=sys.stderr)
            return 1
        print(f"federation up in {waited:.1f}s: {fed.running()}")
    elif a.cmd == "status":
        running = fed.running()
        print(f"processes: {running or 'none'}")
        if SERVER in running:
            try:
                print(f"registered hospitals: {fed.connected_clients()}")
            except Exception as e:  # NoConnection while the server starts or stops: one line, not NVFlare's trace
                print(f"registered hospitals: unknown, the server's admin API did not answer ({type(e).__name__})")
    elif a.cmd == "stop-site":
        if a.name not in fed.running():
            print(f"{a.name}: not running (pids.json has no live process for it)")
        else:
            fed.stop_site(a.name)
            print(f"stopped {a.name}")
    else:
        print(f"stopped: {fed.stop() or 'nothing was running'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
