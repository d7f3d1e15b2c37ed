"""The FL admin's NVFlare session, opened without the two waits NVFlare's own login adds (docs/bench_admin.md).

`new_secure_session` took 1.3-2.5 s on a quiet loopback federation, of which the work is a TLS connection and two
signed messages. The rest:
- NVFlare looks for an optional `comm_config.json` a dozen times while it builds the connection and, when nothing
  told it where, walks the whole current directory for it: from a checkout that is .venv, data/ and runs/ (44,000
  entries here, more with every downloaded job). Told the admin kit's own folders, it walks a handful of files; it
  also can no longer pick up a `comm_config.json` that belongs to some hospital kit below the current directory.
- Its login's first challenge goes out before the new connection is up, fails, and is retried after a fixed 1 s
  (`Authenticator(retry_interval=1.0)` in nvflare.fuel.hci.client.api). Here the retry comes after 0.1 s; the
  overall login timeout is unchanged.
"""

from __future__ import annotations

from pathlib import Path

LOGIN_RETRY_S = 0.1


def kit_config_dirs(kit: Path) -> list[str]:
    """The admin kit's own folders, where NVFlare's ConfigService looks for its optional config files."""
    return [str(Path(kit) / d) for d in ("local", "startup") if (Path(kit) / d).is_dir()]


def _prepare(kit: Path) -> None:
    from nvflare.fuel.hci.client import api
    from nvflare.fuel.utils.config_service import ConfigService

    dirs = kit_config_dirs(kit)
    if dirs:
        ConfigService.initialize(section_files={}, config_path=dirs)
    base = api.Authenticator
    if getattr(base, "fedmed_quick_retry", False):
        return

    class QuickRetry(base):
        fedmed_quick_retry = True

        def __init__(self, *args, **kwargs):
            kwargs["retry_interval"] = min(float(kwargs.get("retry_interval", LOGIN_RETRY_S)), LOGIN_RETRY_S)
            super().__init__(*args, **kwargs)

    api.Authenticator = QuickRetry


def new_admin_session(kit: Path, user: str, timeout: float = 30.0):
    """nvflare.fuel.flare_api.flare_api.new_secure_session(user, kit), the same session, sooner."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    _prepare(kit)
    return new_secure_session(user, str(kit), timeout=timeout)
