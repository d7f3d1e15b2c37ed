"""The global model file as inference sees it: weights, meta (round, thresholds, image size), content hash; and
choosing each finding's decision threshold on labelled validation data (Youden's J), stored in the file's meta.

The server's persistor writes ``{"state_dict": ..., "meta": {...}}``; a plain state dict (a bundle's model.pt) is
read too. Thresholds live in ``meta["thresholds"]`` as {finding: probability}.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from fedmed.inference.ood import META_OOD, OodStatistics, fit_ood, ood_from_meta, pooled_features
from fedmed.job.constants import CXR14_FINDINGS, META_ENCRYPTED
from fedmed.job.tasks import CHEST_XRAY14, TaskSpec, get_task
from fedmed.learning.metrics import youden_thresholds
from fedmed.models.model_card import ModelCard, card_from_meta, clinical_use_warning
from fedmed.models.network import HEAD_PREFIX, build_densenet121
from fedmed.models.weights import save_state

DEFAULT_THRESHOLD = 0.5
ARGMAX_RULE = "multiclass: argmax"  # the decision rule of a multi-class model (no thresholds)
DEFAULT_IMAGE_SIZE = 128  # the job's default training size (jobs/cxr_densenet/job.py --image-size)
META_ROUND = "round"
META_THRESHOLDS = "thresholds"
META_THRESHOLD_METHOD = "threshold_method"
META_THRESHOLD_DATA = "threshold_data"
META_IMAGE_SIZE = "image_size"
META_TASK = "task"  # the job's task (fedmed.job.tasks), written by the Controller; absent in older files = chest
META_WEIGHTS_SHA256 = "sha256"  # best_model.pt: the Controller's hash of the weights, as in the run's rounds table


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Thresholds:
    """Per-finding decision thresholds and where each came from (the model file, or the 0.5 fallback)."""

    values: dict  # finding -> threshold
    from_model: dict  # finding -> bool
    method: Optional[str]

    @property
    def source(self) -> str:
        n = sum(self.from_model.values())
        if n == len(self.values):
            return f"model ({self.method})"
        if n == 0:
            return f"default {DEFAULT_THRESHOLD} (the model file has no thresholds)"
        missing = [f for f, ok in self.from_model.items() if not ok]
        return f"model ({self.method}); default {DEFAULT_THRESHOLD} for {', '.join(missing)} (no threshold stored)"


@dataclass(frozen=True)
class ModelFile:
    path: Path
    state_dict: dict
    meta: dict
    sha256: str

    @property
    def norm(self) -> str:
        # BatchNorm keeps running statistics; the DP (GroupNorm) variant has none.
        return "batch" if any(k.endswith("running_mean") for k in self.state_dict) else "group"

    @property
    def num_outputs(self) -> int:
        return int(self.state_dict[HEAD_PREFIX + "weight"].shape[0])

    @property
    def version(self) -> str:
        """Human-readable version: the federated round the weights come from (the file hash identifies them)."""
        r = self.meta.get(META_ROUND)
        return f"round {r}" if r is not None else "unversioned (no round in meta)"

    @property
    def card(self) -> Optional[ModelCard]:
        """The model card the file carries (fedmed.models.model_card), None for files written without one."""
        return card_from_meta(self.meta, str(self.path.name))

    @property
    def ood(self) -> Optional[OodStatistics]:
        """The out-of-distribution statistics the file carries (fedmed.inference.ood), None when not calibrated."""
        return ood_from_meta(self.meta, str(self.path.name))

    @property
    def clinical_use_warning(self) -> Optional[str]:
        """The not-for-clinical-use line every output repeats (synthetic training data, or no card to say)."""
        return clinical_use_warning(self.card)

    @property
    def name(self) -> str:
        """The one human-readable model identity outputs show: file, task and round (the file hash beside it,
        labelled model_file_sha256, identifies the exact bytes)."""
        return f"{self.path.name} ({self.task().name}, {self.version})"

    def identity(self) -> dict:
        """The model identity for JSON outputs: one name, the hash of the model file's bytes, and (when the
        Controller wrote it) the hash of the weights as the run's database records them, each labelled."""
        out = {"name": self.name, "model_file_sha256": self.sha256}
        if self.meta.get(META_WEIGHTS_SHA256):
            out["weights_sha256_in_run_record"] = str(self.meta[META_WEIGHTS_SHA256])
        return out

    def image_size(self, override: Optional[int] = None) -> int:
        size = override or self.meta.get(META_IMAGE_SIZE) or DEFAULT_IMAGE_SIZE
        return int(size)

    def task(self, override: Optional[str] = None) -> TaskSpec:
        """The task these weights were trained for: `override`, else the meta's, else chest_xray14."""
        return get_task(override or self.meta.get(META_TASK) or CHEST_XRAY14.name)  # files from before tasks: chest

    def classes(self, task: TaskSpec) -> list:
        """The output names of these weights under `task`; raises naming the file when the head does not fit it
        (a multi-label model may have fewer outputs than findings, a multi-class one must have exactly one per class)."""
        n, k = self.num_outputs, task.num_outputs
        if n > k or (task.is_multiclass and n != k):
            raise ValueError(
                f"{self.path}: the model has {n} outputs but task {task.name} has {k} classes "
                f"{list(task.classes)}; wrong --task, or a model file of another task"
            )
        return list(task.classes[:n])

    def thresholds(self, findings: Sequence[str] = CXR14_FINDINGS) -> Thresholds:
        stored = self.meta.get(META_THRESHOLDS) or {}
        values = {f: float(stored.get(f, DEFAULT_THRESHOLD)) for f in findings}
        return Thresholds(values, {f: f in stored for f in findings}, self.meta.get(META_THRESHOLD_METHOD))

    def build(self) -> torch.nn.Module:
        """The DenseNet-121 with these weights, in eval mode."""
        model = build_densenet121(self.num_outputs, norm=self.norm)
        model.load_state_dict(self.state_dict)
        return model.eval()


def read_model_file(path: Path) -> ModelFile:
    """Raises FileNotFoundError / ValueError naming the file when it is missing or holds no DenseNet weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a state dict or {{'state_dict', 'meta'}}, got {type(blob).__name__}")
    state = blob.get("state_dict", blob)
    meta = dict(blob.get("meta") or {}) if "state_dict" in blob else {}
    if HEAD_PREFIX + "weight" not in state and META_ENCRYPTED in meta:
        raise ValueError(
            f"{path}: the classifier head is CKKS-encrypted (the server's copy of an HE run); use a "
            f"hospital's final_global_model.pt, which holds the decrypted model"
        )
    if HEAD_PREFIX + "weight" not in state:
        raise ValueError(f"{path}: no {HEAD_PREFIX}weight; not a fedmed DenseNet-121 state dict")
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    model = ModelFile(path, state, meta, file_sha256(path))
    model.card  # noqa: B018 - a malformed card or OOD statistics are refused here, naming the file, before
    model.ood  # noqa: B018   anything is written
    return model


def write_model_file(path: Path, state_dict: dict, meta: dict) -> None:
    """Atomic write in the persistor's format (fedmed.models.weights.save_state, the one writer of model files)."""
    save_state(state_dict, path, meta)


def choose_thresholds(
    model_path: Path,
    dicom_root: Path,
    labels_csv: Path,
    out_path: Path,
    split: Optional[str] = "val",
    image_size: Optional[int] = None,
    batch_size: int = 32,
    ood: bool = True,
) -> dict:
    """Predict the labelled validation images with the model file, pick each finding's threshold by Youden's J,
    and write a copy of the model file with them (and the image size) in its meta. Returns the new meta.
    With ood, the same images also calibrate the out-of-distribution guard (fedmed.inference.ood), stored in
    meta["ood"]: statistics of these images' features (see docs/THREAT_MODEL.md for what they reveal).

    Args:
        model_path: the global (or best) model file written by the server.
        dicom_root: labelled DICOM tree (a site's ``dicom/`` folder or the global test set).
        labels_csv: its labels CSV (SOPInstanceUID or StudyInstanceUID, split, one 0/1 column per finding).
        out_path: where to write the model file with thresholds (may equal model_path).
        split: which rows of the CSV to use; None for all.
        image_size: preprocessing size; default the meta's, else 128.
        batch_size: images per forward pass.
    """
    from fedmed.data.dataset import RadiographDataset
    from fedmed.data.labels import load_dicom_site
    from fedmed.learning.training import predict

    model_file = read_model_file(model_path)
    if model_file.task().is_multiclass:
        raise ValueError(
            f"{model_path}: a {model_file.task().name} model decides by argmax over its classes; "
            f"decision thresholds are for multi-label models only"
        )
    size = model_file.image_size(image_size)
    items = load_dicom_site(Path(dicom_root), Path(labels_csv), split, task=model_file.task())
    model = model_file.build()
    dataset = RadiographDataset(items, size, train=False)
    labels, probs = predict(model, dataset, batch_size, task=model_file.task())
    findings = CXR14_FINDINGS[: model_file.num_outputs]
    chosen = youden_thresholds(labels, probs, findings)
    meta = dict(model_file.meta)
    meta.update(
        {
            META_THRESHOLDS: chosen,
            META_THRESHOLD_METHOD: "youden_j",
            META_THRESHOLD_DATA: {
                "images": len(items),
                "split": split,
                # the file they were chosen with (this copy's bytes, and so its hash, differ)
                "chosen_with_model_file_sha256": model_file.sha256,
                "positives": {f: int(labels[:, k].sum()) for k, f in enumerate(findings)},
            },
            META_IMAGE_SIZE: size,
        }
    )
    if ood:
        where = f"{Path(dicom_root).name} ({'all rows' if split is None else 'split ' + split})"
        meta[META_OOD] = fit_ood(pooled_features(model, dataset.images, batch_size), where).to_meta()
    write_model_file(out_path, model_file.state_dict, meta)
    return meta
