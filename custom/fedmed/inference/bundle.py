"""Export the global model as a MONAI Bundle: configs/metadata.json, configs/inference.json, models/model.pt, README.md.

The bundle runs with ``python -m monai.bundle run --config_file configs/inference.json --bundle_root B
--dataset_dir DICOM_FOLDER --output_dir OUT`` and writes ``OUT/predictions.csv`` (file, one probability per class).
Network, preprocessing, inferer and evaluator are MONAI components named by ``_target_``; fedmed supplies only the
DICOM side (which files the task's model reads: frontal chest radiographs or axial brain MR slices, and reading them
with rescale/MONOCHROME1 handled), so the bundle needs the ``fedmed`` package importable. The JSON holds data: the
dataset folder is a config item to override. The task (model file meta "task", or ``task``) sets the data list,
the activation (sigmoid or softmax) and the texts; BUNDLE_TEXTS holds the per-task wording.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Optional

import monai
import numpy as np
import pydicom
import torch
from monai.data import CSVSaver

from fedmed.data.transforms import INTENSITY_PERCENTILES, RESIZE_MODE
from fedmed.inference.model_file import ARGMAX_RULE, read_model_file
from fedmed.job.tasks import BRAIN_MRI, CHEST_XRAY14, TaskSpec

BUNDLE_VERSION = "0.2.0"  # 0.2.0: predictions.csv has a header row; skipped.csv lists the files left out
PREDICTIONS_CSV = "predictions.csv"
SKIPPED_CSV = "skipped.csv"


class PredictionsSaver(CSVSaver):
    """MONAI's CSVSaver with a header row (``file`` then one column per class), so the file says which
    probability is which. MONAI's writes none; its rows and order are unchanged."""

    def __init__(self, output_dir: str, filename: str, header: list):
        super().__init__(output_dir=output_dir, filename=filename, overwrite=True)
        self.header = list(header)

    def finalize(self) -> None:
        if not self._filepath.exists() or self._filepath.stat().st_size == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._filepath.write_text(self.delimiter.join(self.header) + "\n")
        super().finalize()


# What the bundle's metadata and README say about each task's model (the code paths ask the task itself).
BUNDLE_TEXTS = {
    CHEST_XRAY14.name: {
        "name": "fedmed chest X-ray DenseNet-121",
        "task": "Multi-label classification of 14 ChestX-ray14 findings on frontal chest radiographs",
        "description": "DenseNet-121 trained by federated learning (NVFlare, fedmed) across hospitals; "
        "outputs one sigmoid probability per finding.",
        "data_source": "Federated hospital DICOM (CR/DX, PA/AP); no data leaves a hospital",
        "image_classes": "single-channel radiograph, rescaled and MONOCHROME1-inverted, percentile-scaled to [0, 1]",
        "modality": "CR/DX",
        "outputs": "14 ChestX-ray14 findings, one sigmoid probability each, from frontal (PA/AP) CR/DX chest radiographs.",
        "selection": "frontal-view selection",
        "images": "frontal image",
        "read_as": "MONOCHROME1 inverted (bright = dense)",
    },
    BRAIN_MRI.name: {
        "name": "fedmed brain MRI DenseNet-121",
        "task": "Multi-class classification of brain tumour type (glioma, meningioma, pituitary, no tumour) on axial "
        "MR slices",
        "description": "DenseNet-121 trained by federated learning (NVFlare, fedmed) across hospitals; "
        "outputs softmax probabilities over 4 classes; the predicted class is the argmax.",
        "data_source": "Federated hospital DICOM (MR, axial T1-weighted slices); no data leaves a hospital",
        "image_classes": "single-channel axial MR slice, rescaled, percentile-scaled to [0, 1]",
        "modality": "MR",
        "outputs": "4 classes (glioma, meningioma, pituitary, no tumour), softmax probabilities summing to 1, from "
        "axial MR slices of the brain.",
        "selection": "axial-slice selection",
        "images": "axial MR slice",
        "read_as": "MONOCHROME1 inverted (bright = high signal)",
    },
}


def network_def(norm: str, num_outputs: int) -> dict:
    """fedmed.models.network.build_densenet121 spelled as MONAI's DenseNet121 config (the same module tree and weights)."""
    net = {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": num_outputs}
    if norm == "group":
        net.update({"norm": ["group", {"num_groups": 32}], "act": ["relu", {"inplace": False}]})
    return net


def datalist_def(task: TaskSpec) -> dict:
    """The MONAI data list of the images infer would read for this task (chest keeps the name older bundles use);
    every file left out is listed with its reason in SKIPPED_CSV beside the predictions."""
    skipped = f"$@output_dir + '/{SKIPPED_CSV}'"
    if task.name == CHEST_XRAY14.name:
        return {
            "_target_": "fedmed.inference.studies.frontal_image_datalist",
            "root": "@dataset_dir",
            "skipped_csv": skipped,
        }
    return {
        "_target_": "fedmed.inference.studies.task_image_datalist",
        "root": "@dataset_dir",
        "task": task.name,
        "skipped_csv": skipped,
    }


def load_def(task: TaskSpec) -> dict:
    """fedmed's DICOM reader for the task's modalities (chest: its default, the projection radiographs)."""
    load = {"_target_": "fedmed.data.transforms.LoadRadiographd", "keys": "image"}
    if task.name != CHEST_XRAY14.name:
        load["modalities"] = sorted(task.modalities)
    return load


def inference_config(
    image_size: int,
    norm: str,
    num_outputs: int,
    batch_size: int = 16,
    task: TaskSpec = CHEST_XRAY14,
    classes: Optional[list] = None,
) -> dict:
    keys = "image"
    activation = "softmax" if task.is_multiclass else "sigmoid"
    return {
        "bundle_root": ".",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "dataset_dir": "",  # override: --dataset_dir /path/to/dicom (a file, a study folder or a tree)
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cpu')",
        "image_size": image_size,
        "batch_size": batch_size,
        "network_def": network_def(norm, num_outputs),
        "network": "$@network_def.to(@device)",
        "datalist": datalist_def(task),
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                load_def(task),
                {"_target_": "EnsureChannelFirstd", "keys": keys, "channel_dim": "no_channel"},
                {
                    "_target_": "ScaleIntensityRangePercentilesd",
                    "keys": keys,
                    "lower": INTENSITY_PERCENTILES[0],
                    "upper": INTENSITY_PERCENTILES[1],
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {
                    "_target_": "Resized",
                    "keys": keys,
                    "spatial_size": ["@image_size", "@image_size"],
                    "mode": RESIZE_MODE,
                },
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": "@batch_size",
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", activation: True}],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "cpu",
            },
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": PREDICTIONS_CSV,
                "saver": {
                    "_target_": "fedmed.inference.bundle.PredictionsSaver",
                    "output_dir": "@output_dir",
                    "filename": PREDICTIONS_CSV,
                    "header": ["file"] + [f"p_{c}" for c in (classes or task.classes[:num_outputs])],
                },
                "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
                "output_transform": "$lambda x: [xx['pred'] for xx in x]",
            },
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def metadata(model, image_size: int, findings: list, task: TaskSpec = CHEST_XRAY14) -> dict:
    text = BUNDLE_TEXTS[task.name]
    if task.is_multiclass:
        decision = {"task": task.name, "decision_rule": ARGMAX_RULE}
    else:
        thresholds = model.thresholds(findings)
        decision = {"thresholds": thresholds.values, "thresholds_source": thresholds.source}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported from {model.path.name} ({model.version})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"pydicom": pydicom.__version__, "fedmed": "this repository's custom/fedmed"},
        "name": text["name"],
        "task": text["task"],
        "description": text["description"],
        "authors": "fedmed",
        "copyright": "fedmed",
        "intended_use": ((model.clinical_use_warning + ". ") if model.clinical_use_warning else "")
        + (model.card.intended_use if model.card else "Research and decision support only; not for primary diagnosis."),
        "data_source": text["data_source"],
        "data_type": "dicom",
        "image_classes": text["image_classes"],
        "label_classes": {str(i): f for i, f in enumerate(findings)},
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": text["modality"],
                    "num_channels": 1,
                    "spatial_shape": [image_size, image_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(findings),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {str(i): f for i, f in enumerate(findings)},
                }
            },
        },
        "fedmed": {
            "clinical_use_warning": model.clinical_use_warning,
            "model": model.identity(),
            "source_model_file": model.path.name,
            "round": model.meta.get("round"),
            "norm": model.norm,
            "model_card": model.card.to_meta() if model.card else None,
            **decision,
            "platform": platform.platform(),
        },
    }


README = """# {name} (MONAI Bundle)
{warning}
Exported by `scripts/export_bundle` from model {identity} (model file sha256 `{sha256}`).
{outputs}
Research and decision support only; not for primary diagnosis.

## Model card

{card}

## Run

Needs MONAI {monai_version}, PyTorch, pydicom and the `fedmed` package installed (the fedmed venv, or
`pip install` of the fedmed checkout): the bundle uses fedmed's DICOM reader (RescaleSlope/Intercept, MONOCHROME1,
rejection of non-image/colour/multi-frame/undecodable files) and its {selection}; network,
preprocessing and evaluation are MONAI components.

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --dataset_dir /path/to/dicom --output_dir ./eval
```

`dataset_dir` is a DICOM file, study folder or tree (files with or without `.dcm`). Output: `eval/{predictions}`,
a header row, then one line per {images}: file path, then the {count} probabilities in this order: {findings}.
`eval/{skipped}` lists every file left out (`file,status,reason`): "skipped" for unusable files, "ignored" for
images this model does not read, with the same reasons `fedmed-infer` gives.

## Preprocessing (the same as training)

Read with rescale applied and {read_as}, channel first, intensity scaled between the
{lo}th and {hi}th percentiles to [0, 1] (clipped), resized to {size}x{size} ({mode}).

## {decision_title}

{decision}
"""


def export_bundle(
    model_path: Path, out_dir: Path, image_size: Optional[int] = None, batch_size: int = 16, task: Optional[str] = None
) -> Path:
    """Write the bundle folder; returns it.

    Args:
        model_path: the server's global/best model file (with or without thresholds).
        out_dir: the bundle folder to create (existing files in it are overwritten).
        image_size: input size; default the model file's, else 128.
        batch_size: images per forward pass in the bundle's evaluator.
        task: the model's task (fedmed.job.tasks name); default the model file's meta "task", else chest_xray14.
    """
    model = read_model_file(model_path)
    spec = model.task(task)
    size = model.image_size(image_size)
    findings = model.classes(spec)
    out_dir = Path(out_dir)
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict, out_dir / "models" / "model.pt")
    meta = metadata(model, size, findings, spec)
    (out_dir / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    config = inference_config(size, model.norm, model.num_outputs, batch_size, spec, findings)
    (out_dir / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    if spec.is_multiclass:
        decision_title = "Decision"
        decision = f"The predicted class is the one of highest probability ({ARGMAX_RULE}); there are no thresholds."
    else:
        decision_title = "Decision thresholds"
        thresholds = meta["fedmed"]["thresholds"]
        table = "\n".join(
            ["| finding | threshold |", "|---|---|"] + [f"| {f} | {t:.4f} |" for f, t in thresholds.items()]
        )
        decision = (
            f"Per finding, probability >= threshold is positive ({meta['fedmed']['thresholds_source']}):\n\n{table}"
        )
    card_lines = model.card.lines() if model.card else ["This model file carries no model card."]
    warning = f"\n**{model.clinical_use_warning}**\n" if model.clinical_use_warning else ""
    (out_dir / "README.md").write_text(
        README.format(
            identity=model.name,
            sha256=model.sha256,
            warning=warning,
            skipped=SKIPPED_CSV,
            card="\n".join(f"- {line}" for line in card_lines),
            monai_version=monai.__version__,
            predictions=PREDICTIONS_CSV,
            findings=", ".join(findings),
            count=len(findings),
            lo=INTENSITY_PERCENTILES[0],
            hi=INTENSITY_PERCENTILES[1],
            size=size,
            mode=RESIZE_MODE,
            decision_title=decision_title,
            decision=decision,
            **{k: BUNDLE_TEXTS[spec.name][k] for k in ("name", "outputs", "selection", "images", "read_as")},
        )
    )
    return out_dir
