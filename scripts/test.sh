#!/usr/bin/env bash
# README command 2 (and what CI runs): set up, lint and format check (ruff, configured in pyproject.toml), then the
# fast suite, then the real-process (integration) suite.
# Plain `pytest` runs only the fast suite. pytest's exit 5 ("no tests collected") counts as a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
# Debian's PostgreSQL and Orthanc (the PACS the DICOMweb round-trip tests talk to) install while pip installs.
( ./scripts/ensure_postgres.sh && ./scripts/ensure_orthanc.sh ) &
system_packages=$!
./scripts/setup.sh || { wait "$system_packages"; exit 1; }
wait "$system_packages" || exit 1
export FEDMED_REQUIRE_POSTGRES=1  # the PostgreSQL tests must run, not skip
export FEDMED_REQUIRE_ORTHANC=1  # and the PACS (Orthanc) tests
run() {
  .venv/bin/python -m pytest "$@"
  rc=$?
  if [ "$rc" -eq 5 ]; then echo "[test] no tests were collected for: pytest $*" >&2; exit 1; fi
  [ "$rc" -eq 0 ] || exit "$rc"
}
echo "[test] lint: ruff check"
.venv/bin/ruff check custom scripts jobs tests || exit 1
echo "[test] format: ruff format --check (run 'ruff format custom scripts jobs tests' to fix)"
.venv/bin/ruff format --check custom scripts jobs tests || exit 1
# Both suites on two workers (pytest-xdist; CI has 2 cores): much of a test's time is one Python thread, a process
# starting, or a federation waiting on its peers, which the other worker fills. --dist loadfile keeps a test file on
# one worker, so a module's shared federation (e.g. test_deployment.py's) and its fixtures are set up once.
# FEDMED_TEST_WORKERS=0 runs them in this process, one after another.
workers=(-n "${FEDMED_TEST_WORKERS:-2}" --dist loadfile)
echo "[test] fast suite"
run -q "${workers[@]}" --durations=25
echo "[test] integration suite (NVFlare simulator, real PostgreSQL server, real Orthanc PACS)"
run -q -m integration "${workers[@]}" --durations=25
