"""Export the global model as a MONAI Bundle (configs/metadata.json, configs/inference.json, models/model.pt,
README.md) that runs with `python -m monai.bundle run --config_file configs/inference.json --dataset_dir DICOM`.
The task (chest_xray14: frontal radiographs, sigmoid; brain_mri: axial MR slices, softmax) is --task, else the model
file's meta "task", else chest_xray14.

    scripts/export_bundle --model global_model.pt --out bundles/fedmed_cxr
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmed.inference.bundle import export_bundle
from fedmed.job.tasks import TASKS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model file (global_model.pt / best_model.pt)")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--image-size", type=int, help="input size (default the model file's, else 128)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass in the bundle (default 16)")
    p.add_argument(
        "--task", choices=sorted(TASKS), help="the model's task (default the model file's, else chest_xray14)"
    )
    a = p.parse_args(argv)
    try:
        out = export_bundle(a.model, a.out, a.image_size, a.batch_size, a.task)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"bundle written to {out}; run it with:\n  python -m monai.bundle run --config_file "
        f"{out}/configs/inference.json --bundle_root {out} --dataset_dir DICOM_FOLDER --output_dir OUT"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
