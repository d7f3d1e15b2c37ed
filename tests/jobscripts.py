"""Load a job script (jobs/<name>/job.py), not a package, as a module."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(module_name: str, path: Path):
    spec = importlib.util.spec_from_file_location(module_name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_job_script(name: str):
    return _load(f"{name}_job", REPO / "jobs" / name / "job.py")
