"""Label sources a hospital may have: a per-site CSV keyed by SOPInstanceUID (our DICOM layout), NIH's ChestX-ray14
layout (``images/*.png`` + ``Data_Entry_2017.csv``), or a generic manifest (``path,<label columns>``).

Label columns follow the task (fedmed.job.tasks): one 0/1 column per finding for a multi-label task, one ``label``
column naming the class for a multi-class task."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fedmed.job.constants import COL_PATH, COL_SOP_UID, COL_SPLIT, COL_STUDY_UID, CXR14_FINDINGS, NO_FINDING
from fedmed.data.dicom import UnusableDicomError, iter_dicom_files, read_header
from fedmed.job.tasks import CHEST_XRAY14, COL_CLASS_LABEL, TaskSpec

log = logging.getLogger(__name__)

# Patient columns a CSV reader may have; the privacy ledger charges per patient where one is given (DICOM images
# carry their own PatientID, read by fedmed.privacy.identity).
CXR14_PATIENT_COL = "Patient ID"
COL_PATIENT_ID = "patient_id"


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    labels: np.ndarray  # float32, one entry per class: multi-hot (multilabel task) or one-hot (multiclass task)
    split: str = "train"
    patient_id: Optional[str] = None  # from the reader's CSV, where it has a patient column


def _read_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label CSV not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty label CSV (no header)")
        return list(reader)


def _binary_columns(row: dict, findings: Sequence[str], path: Path, line: int) -> np.ndarray:
    out = np.zeros(len(findings), np.float32)
    for i, f in enumerate(findings):
        if f not in row or row[f] is None:
            raise ValueError(f"{path}: missing column {f!r}")
        v = row[f].strip()
        if v not in ("0", "1"):
            raise ValueError(f"{path} line {line}: column {f!r} must be 0 or 1, got {v!r}")
        out[i] = float(v)
    return out


def _row_labels(row: dict, task: TaskSpec, path: Path, line: int) -> np.ndarray:
    """The label vector of one CSV row, as the task reads it."""
    if not task.is_multiclass:
        return _binary_columns(row, task.classes, path, line)
    if row.get(COL_CLASS_LABEL) is None:
        raise ValueError(f"{path}: task {task.name} needs a {COL_CLASS_LABEL!r} column naming one of "
                         f"{list(task.classes)}, has {list(row)}")
    return task.encode_class(row[COL_CLASS_LABEL], f"{path} line {line}")


def read_site_label_csv(path: Path, task: TaskSpec) -> dict[str, tuple[str, np.ndarray]]:
    """SOPInstanceUID (or StudyInstanceUID when the CSV has no SOP column) -> (split, labels)."""
    rows = _read_csv(path)
    if not rows:
        raise ValueError(f"{path}: label CSV has no rows")
    key = COL_SOP_UID if COL_SOP_UID in rows[0] else COL_STUDY_UID
    if key not in rows[0]:
        raise ValueError(f"{path}: needs a {COL_SOP_UID} or {COL_STUDY_UID} column, has {list(rows[0])}")
    out = {}
    for line, row in enumerate(rows, start=2):
        uid = (row[key] or "").strip()
        if not uid:
            raise ValueError(f"{path} line {line}: empty {key}")
        split = (row.get(COL_SPLIT) or "train").strip()
        out[uid] = (split, _row_labels(row, task, path, line))
    return out


def load_dicom_site(
    dicom_root: Path, labels_csv: Path, split: Optional[str] = None, *, task: TaskSpec
) -> list[LabelledImage]:
    """Walk a DICOM tree, join each image to its label row by SOPInstanceUID (or StudyInstanceUID).

    Unreadable files, images of a modality the task does not accept and images without a label are skipped with
    one summary warning each cause (never silently); raises if nothing matches, which almost always means the wrong
    folder, CSV or task.
    """
    table = read_site_label_csv(labels_csv, task)
    items, unreadable, unlabelled, wrong_modality = [], [], 0, []
    for path in iter_dicom_files(dicom_root):
        try:
            header = read_header(path)
        except UnusableDicomError as e:
            unreadable.append(str(e))
            continue
        entry = table.get(header.sop_instance_uid) or table.get(header.study_instance_uid)
        if entry is None:
            unlabelled += 1
            continue
        if header.modality not in task.modalities:
            wrong_modality.append(header.modality or "(missing)")
            continue
        if split is None or entry[0] == split:
            items.append(LabelledImage(path, entry[1], entry[0]))
    if unreadable:
        log.warning(f"{len(unreadable)} file(s) under {dicom_root} are not readable DICOM and were skipped; first: {unreadable[0]}")
    if unlabelled:
        log.warning(f"{unlabelled} DICOM image(s) under {dicom_root} have no row in {labels_csv} and were skipped")
    modality_note = ""
    if wrong_modality:
        modality_note = (f"{len(wrong_modality)} labelled image(s) under {dicom_root} have modality "
                         f"{sorted(set(wrong_modality))}, which task {task.name} does not accept "
                         f"({sorted(task.modalities)})")
        log.warning(f"{modality_note}; skipped")
    if not items:
        raise ValueError(
            f"no labelled images for split {split!r} and task {task.name}: {dicom_root} has no DICOM file whose "
            f"SOPInstanceUID or StudyInstanceUID appears in {labels_csv}" + (f" ({modality_note})" if modality_note else "")
        )
    return items


def load_chestxray14(root: Path, csv_name: str = "Data_Entry_2017.csv", image_dir: str = "images") -> list[LabelledImage]:
    """NIH ChestX-ray14: 'Image Index' names a PNG in images/, 'Finding Labels' joins findings with '|'."""
    root = Path(root)
    rows = _read_csv(root / csv_name)
    known = set(CXR14_FINDINGS)
    items = []
    for line, row in enumerate(rows, start=2):
        name, finding_labels = row.get("Image Index"), row.get("Finding Labels")
        if not name or finding_labels is None:
            raise ValueError(f"{root / csv_name} line {line}: needs 'Image Index' and 'Finding Labels'")
        labels = np.zeros(len(CXR14_FINDINGS), np.float32)
        for f in finding_labels.split("|"):
            f = f.strip()
            if f == NO_FINDING:
                continue
            if f not in known:
                raise ValueError(f"{root / csv_name} line {line}: unknown finding {f!r}")
            labels[CXR14_FINDINGS.index(f)] = 1.0
        path = root / image_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{root / csv_name} line {line}: image {path} does not exist")
        items.append(LabelledImage(path, labels, patient_id=(row.get(CXR14_PATIENT_COL) or "").strip() or None))
    return items


def load_csv_manifest(csv_path: Path, task: TaskSpec) -> list[LabelledImage]:
    """Generic manifest: a 'path' column (relative to the CSV's folder or absolute) and the task's label columns."""
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path)
    items = []
    for line, row in enumerate(rows, start=2):
        rel = (row.get(COL_PATH) or "").strip()
        if not rel:
            raise ValueError(f"{csv_path} line {line}: empty or missing 'path'")
        path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
        if not path.is_file():
            raise FileNotFoundError(f"{csv_path} line {line}: image {path} does not exist")
        items.append(LabelledImage(path, _row_labels(row, task, csv_path, line), (row.get(COL_SPLIT) or "train").strip(),
                                   (row.get(COL_PATIENT_ID) or "").strip() or None))
    return items
