"""Chest X-ray DenseNet-121 federated job (14 ChestX-ray14 findings, multi-label), built with NVFlare's FedJob API
(fedmed.flare.fedjob).

Run in the simulator (NVFlare 2.9's SimEnv):
    python jobs/cxr_densenet/job.py --data-root data/hospitals --workspace runs/demo
Export a job folder for the admin console (`submit_job` / `nvflare job submit`):
    python jobs/cxr_densenet/job.py --export-job /tmp/jobs
(NVFlare 2.9 strips a bare `--export` from sys.argv when nvflare.recipe is imported, hence the longer name.)
In an exported job each hospital reads its own data location from its kit's local/fedmed_site.json.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "custom") not in sys.path:
    sys.path.insert(0, str(REPO / "custom"))

from fedmed.flare.fedjob import (DEFAULT_SITES, build_job as build_fedmed_job, he_keys_dir_for,  # noqa: E402, F401
                                 job_main, prepare_simulator_keys, run_simulation)

JOB_NAME = "cxr_densenet"
TASK = "chest_xray14"
build_job = functools.partial(build_fedmed_job, name=JOB_NAME, task=TASK)


def main(argv=None) -> int:
    return job_main(argv, JOB_NAME, TASK, __doc__, REPO / "runs" / "sim")


if __name__ == "__main__":
    sys.exit(main())
