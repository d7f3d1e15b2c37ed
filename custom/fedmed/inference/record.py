"""Where fedmed-infer keeps its inference record: the database of pseudonymised rows, the audit chain's secret key and
its heads file. They belong to the site, never to the results folder: whoever zips and shares the results (a CSV,
overlays for a colleague) must not share the key that lets anyone rewrite the record and re-sign it.

Order: ``--record-dir`` > ``$FEDMED_INFER_RECORD_DIR`` > ``<kit>/local/inference`` when run from a site startup
kit (the current folder holds ``startup/fed_client.json``) > ``$XDG_STATE_HOME/fedmed/inference`` >
``~/.local/state/fedmed/inference``. In it, as the store lays out any SQLite record: ``fedmed.db``,
``local/audit_key`` (0600) and ``audit_heads.log``. ``--db-url`` / ``$FEDMED_DB_URL`` still choose another database
(e.g. the site's PostgreSQL); its key then comes from the environment as for any fedmed database.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

from sqlalchemy.engine import make_url

from fedmed.job.constants import ENV_DB_URL
from fedmed.store.audit import ENV_AUDIT_HEADS, ENV_AUDIT_KEY, ENV_AUDIT_KEY_FILE, HEADS_NAME, default_key_file
from fedmed.store.repository import default_db_url

ENV_RECORD_DIR = "FEDMED_INFER_RECORD_DIR"
KIT_MARKER = Path("startup") / "fed_client.json"
KIT_RECORD = Path("local") / "inference"


def default_record_dir(cwd: Optional[Path] = None, env: Optional[Mapping[str, str]] = None) -> Path:
    """The site's own place for the record when --record-dir is not given (order in the module docstring)."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else Path(cwd)
    if env.get(ENV_RECORD_DIR):
        return Path(env[ENV_RECORD_DIR]).expanduser()
    if (cwd / KIT_MARKER).is_file():
        return cwd / KIT_RECORD
    state = env.get("XDG_STATE_HOME")
    base = Path(state).expanduser() if state else Path.home() / ".local" / "state"
    return base / "fedmed" / "inference"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def record_files(db_url: str, env: Optional[Mapping[str, str]] = None) -> dict:
    """What the record writes on disk for this database: {"database", "audit key", "audit heads"} -> path, each
    only where it is a file (a PostgreSQL database has none; a key given as hex in the environment has none)."""
    env = os.environ if env is None else env
    files = {}
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        files["database"] = Path(url.database)
    key = None
    if not env.get(ENV_AUDIT_KEY):
        key = Path(env[ENV_AUDIT_KEY_FILE]) if env.get(ENV_AUDIT_KEY_FILE) else default_key_file(db_url)
    if key is not None:
        files["audit key"] = key
    heads = Path(env[ENV_AUDIT_HEADS]) if env.get(ENV_AUDIT_HEADS) else key.parent.parent / HEADS_NAME if key else None
    if heads is None and "database" in files:
        heads = files["database"].resolve().parent / HEADS_NAME
    if heads is not None:
        files["audit heads"] = heads
    return files


def resolve_record(out_dir: Path, record_dir: Optional[Path] = None, db_url: Optional[str] = None) -> tuple:
    """(record folder, database URL) for one run; raises ValueError naming the file when any part of the record
    would land inside the results folder ``out_dir``."""
    folder = Path(record_dir).expanduser() if record_dir is not None else default_record_dir()
    url = db_url or os.environ.get(ENV_DB_URL) or default_db_url(folder)
    for what, path in record_files(url).items():
        if _inside(path, Path(out_dir)):
            raise ValueError(
                f"the inference record's {what} would be written inside the results folder ({path}): whoever "
                f"shares the results would share it; give --record-dir (or --db-url) outside --out {out_dir}"
            )
    return folder, url
