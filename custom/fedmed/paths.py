"""Where the checkout's non-Python parts are: fedmed is installed editable from its checkout (scripts/setup.sh
runs `pip install -e .`), and the commands read the site settings, the provisioning project and the job scripts
from beside the package, whatever the current directory."""

from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # <checkout>/custom/fedmed/paths.py
SITE_CONFIGS = CHECKOUT / "site_configs"
PROJECT_YML = CHECKOUT / "provision" / "project.yml"
JOBS = CHECKOUT / "jobs"
RUNS = CHECKOUT / "runs"
