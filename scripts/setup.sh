#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs the pinned requirements (skipped when already up to date), then fedmed
# itself from this checkout (`pip install -e .`: the console commands, and the package for scripts, tests and
# simulator subprocesses alike).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.fedmed-requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing requirements (a few minutes on a fresh machine)"
  # The CPU build of torch first, by exact version, so no other package can pull a multi-GB CUDA build.
  .venv/bin/pip install -q "$(grep -E '^torch==' requirements.txt)"
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site/fedmed-checkout.pth"  # the path hack of earlier set-ups; the editable install replaces it
# Editable, so a checkout's edits take effect at once; --no-deps: the pins above are the dependencies. Again when
# pyproject.toml changed (e.g. a new console command) or the venv's fedmed is not this checkout's.
pstamp=.venv/.fedmed-package.sha256
pwant=$( (sha256sum pyproject.toml; pwd -P) | sha256sum | cut -d' ' -f1)
installed=$(.venv/bin/python -c 'import fedmed.paths as p; print(p.CHECKOUT)' 2>/dev/null || true)
if [ "$(cat "$pstamp" 2>/dev/null || true)" != "$pwant" ] || [ "$installed" != "$(pwd -P)" ]; then
  echo "[setup] installing fedmed from this checkout (pip install -e .)"
  .venv/bin/pip install -q --no-deps -e .
  echo "$pwant" > "$pstamp"
fi
.venv/bin/python -c 'import fedmed, torch, nvflare, monai, tenseal; print(f"[setup] ok: fedmed {fedmed.__version__}, torch {torch.__version__}, nvflare {nvflare.__version__}, monai {monai.__version__}")'
