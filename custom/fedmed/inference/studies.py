"""Finding the studies in a DICOM file, folder or tree, and choosing the frontal chest radiographs to read.

Every file ends up in exactly one place: read (a frontal CR/DX image of a study), ignored (a readable image that is
not for this model, e.g. a lateral view of the same study), or a problem with the reason (anything unusable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from fedmed.data.dicom import UnusableDicomError, image_from_dataset, iter_dicom_files

FRONTAL_MODALITIES = ("CR", "DX")
FRONTAL_VIEWS = ("PA", "AP")
CHEST = "CHEST"


@dataclass(frozen=True)
class FileProblem:
    """A file that was not read, and why. ``reason`` never contains the path (paths may hold patient names)."""

    path: Path
    reason: str

    def message(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class StudyFile:
    path: Path
    sop_instance_uid: str
    view: str


@dataclass
class StudyPlan:
    """One study's files, grouped by StudyInstanceUID. ``patient_id`` stays in memory: it is only pseudonymised and
    copied into the optional Secondary Capture (which must name its patient to be filed in the PACS)."""

    study_uid: str
    patient_id: str
    files: list = field(default_factory=list)  # StudyFile: frontal chest images to read
    problems: list = field(default_factory=list)  # FileProblem: unusable files of this study
    ignored: list = field(default_factory=list)  # FileProblem: readable images this model is not for


@dataclass(frozen=True)
class Discovery:
    studies: tuple  # StudyPlan, sorted by StudyInstanceUID
    unassigned: tuple  # FileProblem: files that belong to no study (not DICOM, no StudyInstanceUID)


@dataclass(frozen=True)
class StudyImage:
    """A decoded frontal radiograph: (rows, cols) float32, rescaled, bright = dense."""

    file: StudyFile
    pixels: np.ndarray


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    return str(getattr(ds, keyword, "") or "").strip().upper()


def selection_verdict(ds: pydicom.Dataset) -> tuple[str, Optional[str]]:
    """Decide from the header alone: ("read", None), ("ignored", reason) or ("problem", reason).

    Only a frontal CR/DX view is read. Other modalities are left to the full read ("read"), whose checks name the
    exact reason (SR, CT, colour, ...). A lateral view is ignored, not an error: chest studies usually hold one.
    """
    modality = _text(ds, "Modality")
    if modality not in FRONTAL_MODALITIES:
        return "read", None  # image_from_dataset rejects it with the precise reason
    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part != CHEST:
        return "problem", f"body part {body_part} is not {CHEST}; this model reads chest radiographs only"
    view = _text(ds, "ViewPosition")
    if not view:
        return "problem", "no ViewPosition: cannot tell a frontal (PA/AP) from a lateral view"
    if view not in FRONTAL_VIEWS:
        return "ignored", f"view {view} is not frontal ({'/'.join(FRONTAL_VIEWS)}); only frontal views are read"
    return "read", None


def discover_studies(root: Path) -> Discovery:
    """Group every file under root (one file, a study folder or a tree) by StudyInstanceUID, reading headers only."""
    plans: dict[str, StudyPlan] = {}
    unassigned = []
    for path in iter_dicom_files(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as e:
            unassigned.append(FileProblem(path, f"not a readable DICOM file ({type(e).__name__}: {e})"))
            continue
        study_uid = str(getattr(ds, "StudyInstanceUID", "") or "").strip()
        if not study_uid:
            unassigned.append(FileProblem(path, "no StudyInstanceUID; cannot tell which study it belongs to"))
            continue
        plan = plans.setdefault(study_uid, StudyPlan(study_uid, str(getattr(ds, "PatientID", "") or "")))
        verdict, reason = selection_verdict(ds)
        if verdict == "ignored":
            plan.ignored.append(FileProblem(path, reason))
        elif verdict == "problem":
            plan.problems.append(FileProblem(path, reason))
        else:
            sop = str(getattr(ds, "SOPInstanceUID", "") or "")
            plan.files.append(StudyFile(path, sop, _text(ds, "ViewPosition")))
    return Discovery(tuple(plans[k] for k in sorted(plans)), tuple(unassigned))


def read_study_file(file: StudyFile) -> StudyImage:
    """Decode one chosen file; raises UnusableDicomError naming the reason."""
    try:
        ds = pydicom.dcmread(file.path)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as e:
        raise UnusableDicomError(file.path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    return StudyImage(file, image_from_dataset(ds, file.path, FRONTAL_MODALITIES))


def load_study(plan: StudyPlan) -> tuple[list, list]:
    """Decode a study's chosen files: (StudyImage list, FileProblem list). One bad file never stops the others."""
    images, problems = [], []
    for f in plan.files:
        try:
            images.append(read_study_file(f))
        except UnusableDicomError as e:
            problems.append(FileProblem(f.path, e.reason))
        except Exception as e:  # noqa: BLE001 - the batch boundary: a decoder bug in one file must not stop a night's run
            problems.append(FileProblem(f.path, f"unexpected error while decoding ({type(e).__name__}: {e})"))
    return images, problems


def frontal_image_datalist(root: str) -> list[dict]:
    """MONAI data list ``[{"image": path}, ...]`` of every decodable frontal chest radiograph under root, in
    StudyInstanceUID then file order: the same selection scripts/infer makes (used by the exported bundle)."""
    out = []
    for plan in discover_studies(Path(root)).studies:
        images, _ = load_study(plan)
        out.extend({"image": str(im.file.path)} for im in images)
    if not out:
        raise ValueError(f"no usable frontal chest radiograph (CR/DX, PA/AP) under {root}")
    return out
