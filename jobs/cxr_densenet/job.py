"""Chest X-ray DenseNet-121 federated job (14 ChestX-ray14 findings, multi-label), built with NVFlare's FedJob API
(fedmed.flare.fedjob).

Run in the simulator (NVFlare 2.9's SimEnv):
    .venv/bin/python jobs/cxr_densenet/job.py --data-root data/hospitals --workspace runs/demo
Export a job folder for the admin console (`submit_job` / `nvflare job submit`):
    .venv/bin/python jobs/cxr_densenet/job.py --export-job /tmp/jobs
(NVFlare 2.9 strips a bare `--export` from sys.argv when nvflare.recipe is imported, hence the longer name.)
In an exported job each hospital reads its own data location from its kit's local/fedmed_site.json.
"""

from __future__ import annotations

import functools
import sys

from fedmed.flare.fedjob import build_job as build_fedmed_job
from fedmed.flare.fedjob import job_main
from fedmed.job.jobconfig import JobConfig
from fedmed.paths import RUNS

# This job's settings; every option of main() defaults to them (the rest are JobConfig's defaults).
CONFIG = JobConfig(name="cxr_densenet", task="chest_xray14")
build_job = functools.partial(build_fedmed_job, CONFIG)  # build_job(num_rounds=2, data_root=...) -> FedJob


def main(argv=None) -> int:
    return job_main(argv, CONFIG, __doc__, RUNS / "sim")


if __name__ == "__main__":
    sys.exit(main())
