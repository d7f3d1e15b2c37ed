#!/usr/bin/env bash
# The main job: set up, generate 3 synthetic DICOM hospitals, run the federated DenseNet-121 job in the NVFlare
# simulator (SimEnv) on the embedded defaults (SQLite), then print the per-round table from the database.
#   ./scripts/demo.sh [--rounds 3 ...]             chest X-ray, 14 findings (jobs/cxr_densenet)
#   ./scripts/demo.sh brain_mri [--rounds 3 ...]   brain MRI, 4 tumour classes (jobs/brain_mri_densenet)
# Extra arguments go to the job's job.py.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=chest_xray14 JOB=cxr_densenet DEFAULT_DATA=data/hospitals DEFAULT_WS=runs/demo
if [[ "${1:-}" == "brain_mri" ]]; then
  TASK=brain_mri JOB=brain_mri_densenet DEFAULT_DATA=data/brain_hospitals DEFAULT_WS=runs/demo_mri
  shift
fi
./scripts/setup.sh
DATA=${FEDMED_DATA:-$DEFAULT_DATA}
WS=${FEDMED_WORKSPACE:-$DEFAULT_WS}
mkdir -p "$WS"
WS=$(cd "$WS" && pwd)
export FEDMED_DB_URL=${FEDMED_DB_URL:-sqlite:///$WS/fedmed.db}
echo "[demo] hospitals in $DATA"
.venv/bin/python scripts/generate_hospitals.py --task "$TASK" --out "$DATA"
rm -rf "${WS:?}/$JOB"   # each demo is a fresh simulation; the database keeps every run
LOG="$WS/$JOB.log"     # NVFlare's and Alembic's full output; the console shows one line per round per site
rm -f "$LOG"
echo "[demo] federated run ($TASK): 3 hospitals, NVFlare simulator, workspace $WS/$JOB"
.venv/bin/python "jobs/$JOB/job.py" --data-root "$DATA" --workspace "$WS" --log-file "$LOG" "$@"
echo
.venv/bin/python scripts/rounds_table.py
app="$WS/$JOB/server/simulate_job/app_server"
# the best model's card (and its not-for-clinical-use line: the demo's data is synthetic) heads the report
card=(); [ -f "$app/best_model.pt" ] && card=(--model "$app/best_model.pt")
.venv/bin/python scripts/report.py --out "$WS/report" "${card[@]}" >/dev/null
echo
echo "[demo] global model:  $app/global_model.pt"
echo "[demo] best model:    $app/best_model.pt"
echo "[demo] full log:      $LOG"
echo "[demo] server log:    $WS/$JOB/server/simulate_job/log.txt (site logs: $WS/$JOB/<site>/)"
echo "[demo] database:      $FEDMED_DB_URL"
echo "[demo] report:        $WS/report/report.html"
