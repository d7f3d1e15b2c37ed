#!/usr/bin/env bash
# Install site_configs/<site> into a provisioned startup kit:  site_configs/install.sh <kit_dir> <site> [options]
# (options: --site-config FILE, --db-url URL; see scripts/install_kit.py --help). Uses this checkout's .venv,
# or $FEDMED_PYTHON (a Python with fedmed installed: pip install -e <checkout>).
# Server with a --db-url that is no SQLite file (PostgreSQL): also makes the record's audit key
# <kit_dir>/local/audit_key (0600, never replaced) and sets FEDMED_AUDIT_KEY_FILE to it in <kit_dir>/local/fedmed.env;
# a SQLite record keeps its key in <database folder>/local/audit_key. `install.sh --check <kit_dir>` names it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"  # physical path, as Python resolves it
PY="${FEDMED_PYTHON:-$REPO/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "install.sh: no Python at $PY; run $REPO/scripts/setup.sh first (or set FEDMED_PYTHON)" >&2
  exit 1
fi
# The fedmed that $PY imports must be this checkout's: it reads site_configs/ from beside itself.
installed=$("$PY" -c 'import fedmed.paths as p; print(p.CHECKOUT)' 2>/dev/null || true)
if [[ "$installed" != "$REPO" ]]; then
  echo "install.sh: $PY imports fedmed from '${installed:-nowhere}', not from $REPO; run $REPO/scripts/setup.sh" \
       "first (or pip install -e $REPO)" >&2
  exit 1
fi
exec "$PY" -m fedmed.cli.install_kit "$@"
