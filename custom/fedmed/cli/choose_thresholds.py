"""Choose each finding's decision threshold on labelled validation DICOM (Youden's J) and store them, with the image
size, in a copy of the model file's meta; scripts/infer and scripts/export_bundle read them from there. The same
images calibrate the out-of-distribution guard (feature statistics and a flag threshold; --no-ood to skip): run it
on data the model file may carry statistics of, best the server's own test set (docs/THREAT_MODEL.md).

    scripts/choose_thresholds --model global_model.pt --dicom site/dicom --labels site/labels.csv \\
        --out global_model_thresholds.pt [--split val]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmed.inference.model_file import choose_thresholds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--dicom", type=Path, required=True, help="labelled DICOM tree")
    p.add_argument(
        "--labels", type=Path, required=True, help="labels CSV (SOPInstanceUID/StudyInstanceUID, split, findings)"
    )
    p.add_argument("--out", type=Path, required=True, help="model file to write (may be --model itself)")
    p.add_argument("--split", default="val", help="CSV split to use (default val; 'all' for every row)")
    p.add_argument("--image-size", type=int, help="preprocessing size (default the model file's, else 128)")
    p.add_argument("--no-ood", action="store_true", help="do not calibrate the out-of-distribution guard")
    a = p.parse_args(argv)
    try:
        meta = choose_thresholds(
            a.model, a.dicom, a.labels, a.out, None if a.split == "all" else a.split, a.image_size, ood=not a.no_ood
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = meta["threshold_data"]
    print(
        f"{len(meta['thresholds'])} thresholds chosen on {data['images']} images "
        f"({'split ' + data['split'] if data['split'] else 'every labelled row: --split all'}), "
        f"written to {a.out}"
    )
    for finding, t in meta["thresholds"].items():
        print(f"  {finding:20s} {t:.4f}  ({data['positives'][finding]} positives)")
    if "ood" in meta:
        print(
            f"out-of-distribution guard calibrated on the same {meta['ood']['calibration']['images']} images: "
            f"flag above {meta['ood']['threshold']:.2f}"
        )
    missing = [f for f in data["positives"] if f not in meta["thresholds"]]
    if missing:
        print(f"no threshold (no positive or no negative example; inference uses 0.5): {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
