#!/usr/bin/env bash
# Make sure Debian's PostgreSQL server binaries are installed (the tests start their own throwaway cluster on
# 127.0.0.1; no system service is started or changed).
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[postgres] server binaries missing; run as root or: sudo apt-get install -y postgresql" >&2
  exit 1
fi
echo "[postgres] installing Debian's postgresql package"
export DEBIAN_FRONTEND=noninteractive
# One package-list refresh serves both ensure_*.sh (CI runs them back to back: the stamp says the other just did
# it); should the list still be stale, the install is retried once after a refresh.
stamp=/tmp/fedmed-apt-update.stamp
if [ -z "$(find "$stamp" -newermt '-1 hour' 2>/dev/null)" ]; then
  apt-get update -qq && touch "$stamp"
fi
apt-get install -y -qq postgresql >/dev/null || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
# Debian's package may start a system cluster; ours do not need it. Stop it so nothing is left listening.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
fi
