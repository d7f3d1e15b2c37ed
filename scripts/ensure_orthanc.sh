#!/usr/bin/env bash
# Make sure Debian's Orthanc (a DICOM server, the tests' stand-in for a hospital PACS) and its DICOMweb plugin are
# installed. The tests start their own Orthanc on 127.0.0.1 with a temporary config and storage; no system service
# is started or changed.
set -euo pipefail
plugin_installed() { ls /usr/share/orthanc/plugins*/libOrthancDicomWeb.so* >/dev/null 2>&1 \
  || ls /usr/lib/orthanc/plugins*/libOrthancDicomWeb.so* >/dev/null 2>&1 \
  || dpkg -s orthanc-dicomweb >/dev/null 2>&1; }
if command -v Orthanc >/dev/null 2>&1 && plugin_installed; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "[orthanc] Orthanc or its DICOMweb plugin missing; run as root or: sudo apt-get install -y orthanc orthanc-dicomweb" >&2
  exit 1
fi
echo "[orthanc] installing Debian's orthanc and orthanc-dicomweb packages"
export DEBIAN_FRONTEND=noninteractive
# One package-list refresh serves both ensure_*.sh (CI runs them back to back: the stamp says the other just did
# it); should the list still be stale, the install is retried once after a refresh.
stamp=/tmp/fedmed-apt-update.stamp
if [ -z "$(find "$stamp" -newermt '-1 hour' 2>/dev/null)" ]; then
  apt-get update -qq && touch "$stamp"
fi
apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null || { apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; }
# The package may start a system service on port 8042/4242; ours do not need it. Stop it so nothing is left listening.
if command -v service >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
