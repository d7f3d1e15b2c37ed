"""Generate synthetic DICOM hospitals (non-IID, per-site scanners) plus a global test set, deterministically.

    python scripts/generate_hospitals.py --out data/hospitals [--scale 1.0] [--seed 0]
    python scripts/generate_hospitals.py --task brain_mri --out data/brain_hospitals     (4-class brain MR)
    python scripts/generate_hospitals.py --out data/hard --scale 0.3 --specialist 0.3,0.01 --sign-scale 0.6 \
        --scanner-shift 2      (harder hospitals: few images, specialist label priors, faint signs, far scanners)

Writes <out>/<site>/{dicom/, labels.csv, fedmed_site.json} and <out>/global_test/{dicom/, labels.csv}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from fedmed.data.synthetic import (
    DEFAULT_HOSPITALS,
    SiteSplit,
    chest_family,
    generate_hospitals,
    shift_scanner,
    specialist_priors,
)
from fedmed.data.synthetic_mri import BRAIN_MRI_FAMILY
from fedmed.job.tasks import CHEST_XRAY14, TASKS


def write_site_config(site_dir: Path, site: str, num_threads: int) -> Path:
    """The same fedmed_site.json a hospital writes by hand (see site_configs/), pointing at the generated data."""
    cfg = {
        "site_name": site,
        "data": {"format": "dicom", "root": "dicom", "labels_csv": "labels.csv"},
        "resources": {"num_threads": num_threads},
        "synthetic_rehearsal": True,
    }  # generated data: a deployed site may then run without a privacy policy
    path = site_dir / "fedmed_site.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default=CHEST_XRAY14.name,
        help="chest_xray14 (default): radiographs with 14 findings; brain_mri: axial MR slices, 4 tumour classes",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every site's image count (tests use ~0.1)")
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--size", type=int, default=256, help="stored image size in pixels")
    p.add_argument("--alpha", type=float, default=20.0, help="Dirichlet concentration of site label priors")
    p.add_argument(
        "--min-prevalence",
        type=float,
        default=0.05,
        help="chest only: floor on each finding's prevalence so small sites see rare findings (0 = NIH table)",
    )
    p.add_argument(
        "--specialist",
        metavar="COMMON,RARE",
        help="chest only: specialist hospitals instead of Dirichlet priors: finding i has prevalence COMMON at "
        "hospital i mod n and RARE at the others (e.g. 0.3,0.01)",
    )
    p.add_argument(
        "--sign-scale",
        type=float,
        default=1.0,
        help="chest only: contrast of the lesion signs (1 = default, < 1 = fainter and harder to learn)",
    )
    p.add_argument(
        "--scanner-shift",
        type=float,
        default=1.0,
        help="how far each hospital's scanner sits from the test set's (gamma, contrast, noise, blur; 1 = default)",
    )
    p.add_argument(
        "--site-threads",
        type=int,
        default=max(1, (os.cpu_count() or 1) // len(DEFAULT_HOSPITALS)),
        help="torch threads per simulated site (all sites share this machine's cores)",
    )
    a = p.parse_args(argv)
    if a.scale <= 0:
        p.error(f"--scale must be > 0, got {a.scale}")
    if a.sign_scale < 0:
        p.error(f"--sign-scale must be >= 0, got {a.sign_scale}")
    if a.scanner_shift < 0:
        p.error(f"--scanner-shift must be >= 0, got {a.scanner_shift}")
    if a.task == "brain_mri" and (a.specialist or a.sign_scale != 1.0):
        p.error("--specialist and --sign-scale apply to chest_xray14 only")
    priors = None
    if a.specialist:
        try:
            common, rare = (float(v) for v in a.specialist.split(","))
        except ValueError:
            p.error(f"--specialist takes COMMON,RARE (two numbers), got {a.specialist!r}")
        try:
            priors = specialist_priors(len(DEFAULT_HOSPITALS), common, rare)
        except ValueError as e:
            p.error(f"--specialist: {e}")
    family = BRAIN_MRI_FAMILY if a.task == "brain_mri" else chest_family(a.min_prevalence, a.sign_scale)
    if (a.out / "global_test" / "labels.csv").exists():
        for h in family.hospitals:
            write_site_config(a.out / h.name, h.name, a.site_threads)
        print(f"{a.out} already holds generated hospitals (delete it to regenerate)")
        return 0
    hospitals = [
        replace(
            h,
            num_images=max(4, int(round(h.num_images * a.scale))),
            scanner=shift_scanner(h.scanner, family.test_scanner, a.scanner_shift),
            prevalence=priors[i] if priors else None,
        )
        for i, h in enumerate(family.hospitals)
    ]
    total = sum(h.num_images for h in hospitals) + a.num_test
    with tqdm(total=total, desc=f"generating {a.task} DICOM", unit="img") as bar:
        written = generate_hospitals(
            a.out,
            hospitals,
            a.num_test,
            a.seed,
            size=a.size,
            progress=bar.update,
            family=family,  # carries --min-prevalence
            split=SiteSplit(alpha=a.alpha),
        )
    for h in hospitals:
        write_site_config(a.out / h.name, h.name, a.site_threads)
    for site, csv_path in written.items():
        print(f"{site}: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
