"""What every read-only command does first: check the database URL, open it without ever creating it, and name the
run the admin means the one way every command takes it (fedmed.server.resume.find_run_uid: run number, uid or unique
prefix)."""

from __future__ import annotations

from typing import Optional

from sqlalchemy.exc import SQLAlchemyError

from fedmed.server.resume import find_run_uid
from fedmed.store.repository import Repository
from fedmed.store.urls import check_reader_url, no_create_url


class ReadError(Exception):
    """Something the admin can fix (a wrong URL, run or database); main prints it as one line and exits 2."""


def open_reader(db_url: Optional[str], option: str = "--db-url") -> Repository:
    """A Repository on an existing database, opened so that it cannot create one; ReadError otherwise."""
    try:
        return Repository(no_create_url(check_reader_url(db_url, option)), create_schema=False)
    except ValueError as e:
        raise ReadError(str(e)) from None


def pick_run(repo: Repository, given: Optional[str], purpose: str = "resume") -> int:
    """The run number of `given` (run number, uid or unique prefix), or the latest run's when None."""
    try:
        if given is None:
            return repo.run_id_or_latest(None)
        return repo.run_id_of(find_run_uid(repo, given, purpose))
    except ValueError as e:
        raise ReadError(str(e).removeprefix(f"{purpose}: ")) from None
    except SQLAlchemyError as e:  # e.g. not a fedmed database; a driver message may hold the URL's password
        raise ReadError(f"cannot read the database: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(getattr(e, "orig", None) or e)
    return text.splitlines()[0] if text else ""
