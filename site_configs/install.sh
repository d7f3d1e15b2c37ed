#!/usr/bin/env bash
# Install site_configs/<site> into a provisioned startup kit:  site_configs/install.sh <kit_dir> <site> [options]
# (options: --site-config FILE, --db-url URL; see scripts/install_kit.py --help). Uses this checkout's .venv,
# or $FEDMED_PYTHON.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${FEDMED_PYTHON:-$REPO/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "install.sh: no Python at $PY; run $REPO/scripts/setup.sh first (or set FEDMED_PYTHON)" >&2
  exit 1
fi
exec "$PY" "$REPO/scripts/install_kit.py" "$@"
