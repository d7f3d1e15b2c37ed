"""Brain MRI DenseNet-121 federated job: 4-class tumour classification (glioma, meningioma, pituitary, no tumour;
softmax, round score = global test accuracy), built with NVFlare's FedJob API (fedmed.flare.fedjob): the same
Executor, Controller, aggregation, DP and record as the chest X-ray job, configured with task "brain_mri".

One command (set-up, synthetic MR hospitals, simulation, per-round table):  ./scripts/demo.sh brain_mri
Or by hand:
    python scripts/generate_hospitals.py --task brain_mri --out data/brain_hospitals
    python jobs/brain_mri_densenet/job.py --data-root data/brain_hospitals --workspace runs/demo_mri
Export a job folder for the admin console:  python jobs/brain_mri_densenet/job.py --export-job /tmp/jobs
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "custom") not in sys.path:
    sys.path.insert(0, str(REPO / "custom"))

from fedmed.flare.fedjob import build_job as build_fedmed_job, job_main  # noqa: E402

JOB_NAME = "brain_mri_densenet"
TASK = "brain_mri"
# Tumours are large signs: 96 px keeps them visible and the simulated run to a few minutes on a 2-core CPU.
DEFAULTS = {"image_size": 96, "rounds": 5}
build_job = functools.partial(build_fedmed_job, name=JOB_NAME, task=TASK, image_size=DEFAULTS["image_size"],
                              num_rounds=DEFAULTS["rounds"])


def main(argv=None) -> int:
    return job_main(argv, JOB_NAME, TASK, __doc__, REPO / "runs" / "sim_mri", DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
