"""Database URLs as the admin types them: checked before anything connects, and a reader never creates a database.

SQLAlchemy takes `runs/federation/fedmed.db` (a path, not a URL) as an error deep in its own parser, and opens a
misspelt `sqlite:///.../fedmd.db` by creating an empty file, after which a reader fails with "no such table: runs".
The read-only commands (fedmed-rounds, fedmed-report, fedmed-audit-verify) call check_reader_url first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import quote

SQLITE_PREFIX = "sqlite:///"


class DatabaseUrlError(ValueError):
    """A database URL that cannot be what the admin meant; the message is the one line to print."""


def default_db_url(workspace: Path) -> str:
    """The SQLite record of a workspace or server kit: <workspace>/fedmed.db. Here, not in the repository module,
    so the admin's commands that only name the database need not import SQLAlchemy, torch and scikit-learn."""
    return f"{SQLITE_PREFIX}{Path(workspace).resolve() / 'fedmed.db'}"


def check_url(url: Optional[str], option: str = "--db-url") -> str:
    """url itself when it looks like dialect://...; a bare path gets the sqlite:/// form it most likely meant."""
    url = (url or "").strip()
    if not url:
        raise DatabaseUrlError(f"{option}: no database URL given (e.g. {SQLITE_PREFIX}/abs/path/fedmed.db)")
    if "://" not in url:
        hint = f"{SQLITE_PREFIX}{Path(url).expanduser().resolve()}"
        raise DatabaseUrlError(f"{option} {url!r} is a path, not a database URL: give {hint}")
    return url


def sqlite_file(url: str) -> Optional[Path]:
    """The file of a file-backed SQLite URL (sqlite:///rel or sqlite:////abs), None for others and :memory:."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    path = url[len(SQLITE_PREFIX) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def check_reader_url(url: Optional[str], option: str = "--db-url") -> str:
    """check_url, and for SQLite the file must exist: a reader that opened a misspelt path would create it."""
    url = check_url(url, option)
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.db")) if path.parent.is_dir() else []
        hint = f" ({path.parent} holds {', '.join(near)})" if near else ""
        raise DatabaseUrlError(f"{option}: no database at {path.resolve()}{hint}: check the path (nothing was created)")
    return url


def no_create_url(url: str) -> str:
    """The URL a reader opens: for an SQLite file, SQLite's URI form with mode=rw, which never creates the file
    (a file deleted between check_reader_url and connecting is then an error, not a new empty database)."""
    path = sqlite_file(url)
    if path is None:
        return url
    return f"{SQLITE_PREFIX}file:{quote(str(path.resolve()))}?mode=rw&uri=true"
