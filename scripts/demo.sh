#!/usr/bin/env bash
# The main job: set up, generate 3 synthetic DICOM hospitals, run the federated DenseNet-121 job in the NVFlare
# simulator (SimEnv) on the embedded defaults (SQLite), then print the per-round table from the database.
# Extra arguments go to jobs/cxr_densenet/job.py (e.g. --rounds 3).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
DATA=${FEDMED_DATA:-data/hospitals}
WS=${FEDMED_WORKSPACE:-runs/demo}
mkdir -p "$WS"
WS=$(cd "$WS" && pwd)
export FEDMED_DB_URL=${FEDMED_DB_URL:-sqlite:///$WS/fedmed.db}
echo "[demo] hospitals in $DATA"
.venv/bin/python scripts/generate_hospitals.py --out "$DATA"
rm -rf "$WS/cxr_densenet"   # each demo is a fresh simulation; the database keeps every run
echo "[demo] federated run: 3 hospitals, NVFlare simulator, workspace $WS/cxr_densenet"
.venv/bin/python jobs/cxr_densenet/job.py --data-root "$DATA" --workspace "$WS" "$@"
echo
.venv/bin/python scripts/rounds_table.py
.venv/bin/python scripts/report.py --out "$WS/report" >/dev/null
app="$WS/cxr_densenet/server/simulate_job/app_server"
echo
echo "[demo] global model:  $app/global_model.pt"
echo "[demo] best model:    $app/best_model.pt"
echo "[demo] server log:    $WS/cxr_densenet/server/simulate_job/log.txt (site logs: $WS/cxr_densenet/<site>/)"
echo "[demo] database:      $FEDMED_DB_URL"
echo "[demo] report:        $WS/report/report.html"
