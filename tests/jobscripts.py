"""Load a job script (jobs/<name>/job.py, not a package) as a module, as NVFlare users run it."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_job_script(name: str):
    path = REPO / "jobs" / name / "job.py"
    spec = importlib.util.spec_from_file_location(f"{name}_job", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
