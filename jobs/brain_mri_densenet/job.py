"""Brain MRI DenseNet-121 federated job: 4-class tumour classification (glioma, meningioma, pituitary, no tumour;
softmax, round score = global test accuracy), built with NVFlare's FedJob API (fedmed.flare.fedjob): the same
Executor, Controller, aggregation, DP and record as the chest X-ray job, configured with task "brain_mri".

One command (set-up, synthetic MR hospitals, simulation, per-round table):  ./scripts/demo.sh brain_mri
Or by hand:
    .venv/bin/fedmed-generate-hospitals --task brain_mri --out data/brain_hospitals
    .venv/bin/python jobs/brain_mri_densenet/job.py --data-root data/brain_hospitals --workspace runs/demo_mri
Export a job folder for the admin console:  .venv/bin/python jobs/brain_mri_densenet/job.py --export-job /tmp/jobs
"""

from __future__ import annotations

import functools
import sys

from fedmed.flare.fedjob import build_job as build_fedmed_job
from fedmed.flare.fedjob import job_main
from fedmed.job.jobconfig import JobConfig
from fedmed.paths import RUNS

# Tumours are large signs: 96 px keeps them visible and the simulated run to a few minutes on a 2-core CPU.
CONFIG = JobConfig(name="brain_mri_densenet", task="brain_mri", image_size=96)
build_job = functools.partial(build_fedmed_job, CONFIG)  # build_job(num_rounds=2, data_root=...) -> FedJob


def main(argv=None) -> int:
    return job_main(argv, CONFIG, __doc__, RUNS / "sim_mri")


if __name__ == "__main__":
    sys.exit(main())
