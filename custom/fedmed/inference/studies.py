"""Finding the studies in a DICOM file, folder or tree, and choosing the images the task's model reads: frontal
chest radiographs (chest_xray14) or axial brain MR slices (brain_mri), see ImageSelection.

Every file ends up in exactly one place: read (an image of a study this model is for), ignored (a readable image that
is not for this model, e.g. a lateral view or a sagittal slice of the same study), or a problem with the reason
(anything unusable, including another modality: a chest film given to the brain model, and vice versa).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fedmed.data.dicom import UnusableDicomError, image_from_dataset, iter_dicom_files
from fedmed.job.tasks import BRAIN_MRI, CHEST_XRAY14, TaskSpec, get_task

FRONTAL_MODALITIES = ("CR", "DX")
FRONTAL_VIEWS = ("PA", "AP")
CHEST = "CHEST"
BRAIN_BODY_PARTS = ("BRAIN", "HEAD")
AXIAL = "axial"


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
    modalities: tuple = FRONTAL_MODALITIES  # what the full read accepts (the task's selection)


@dataclass
class StudyPlan:
    """One study's files, grouped by StudyInstanceUID. ``patient_id`` stays in memory: it is only pseudonymised and
    copied into the optional Secondary Capture (which must name its patient to be filed in the PACS)."""

    study_uid: str
    patient_id: str
    accession_number: str = ""  # the hospital's own identifiers: local results only, never the inference log
    study_date: str = ""  # YYYYMMDD as in the header
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


PREAMBLE = b"\0" * 128
DICM = b"DICM"
# the transfer syntax of a dataset read without file meta, from the encoding pydicom detected
ENCODINGS = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


class UnreadableFile(Exception):
    """A file that is not a DICOM dataset fedmed can read; ``reason`` says what is missing (no path in it)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_dataset(path: Path, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """Read a DICOM file, including the two kinds a PACS export or an old modality may give without the standard
    128-byte preamble and 'DICM' marker: file meta with no preamble, and a bare dataset with no file meta at all
    (its transfer syntax then is the encoding pydicom detects). Raises UnreadableFile saying what is missing; the
    reason never ends with pydicom's "Use force=True", which is not something a fedmed user can give."""
    path = Path(path)
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble or no 'DICM' marker: look at what the file holds below
    except (OSError, EOFError, ValueError, TypeError) as e:
        raise UnreadableFile(f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    with open(path, "rb") as f:
        start = f.read(len(DICM))
    if not start:
        raise UnreadableFile("not a DICOM file: the file is empty")
    if start == DICM:  # file meta without the preamble before it
        try:
            return pydicom.dcmread(io.BytesIO(PREAMBLE + path.read_bytes()), stop_before_pixels=stop_before_pixels)
        except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as e:
            raise UnreadableFile(f"DICOM file without a preamble whose file meta cannot be read ({e})") from e
    try:
        with warnings.catch_warnings():  # pydicom warns about the VR it guesses for any bytes, DICOM or not
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
            usable = "SOPClassUID" in ds and "StudyInstanceUID" in ds
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, AttributeError) as e:
        ds, usable = None, False
        parse_error = f" ({type(e).__name__}: {e})"
    else:
        parse_error = ""
    if not usable:
        raise UnreadableFile(
            f"not a DICOM file: no 'DICM' marker after a 128-byte preamble, and no DICOM dataset with a SOPClassUID "
            f"and StudyInstanceUID at its start{parse_error}"
        )
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ENCODINGS[(bool(implicit), bool(little))]
    return ds


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


def slice_plane(ds: pydicom.Dataset) -> Optional[str]:
    """ "axial", "coronal" or "sagittal": the standard plane nearest to the slice (oblique axial brain slices, angled
    to the AC-PC line, count as axial); None when ImageOrientationPatient is missing or unusable."""
    try:
        iop = np.asarray([float(v) for v in getattr(ds, "ImageOrientationPatient", None) or ()], dtype=float)
    except (TypeError, ValueError):
        return None
    if iop.shape != (6,):
        return None
    normal = np.cross(iop[:3], iop[3:])
    if not np.linalg.norm(normal) > 1e-6:
        return None
    return ("sagittal", "coronal", AXIAL)[int(np.argmax(np.abs(normal)))]  # patient x, y, z


def brain_selection_verdict(ds: pydicom.Dataset) -> tuple[str, Optional[str]]:
    """selection_verdict for the brain MR model: ("read", None), ("ignored", reason) or ("problem", reason).

    Only axial MR slices of the brain are read. Other modalities go to the full read, which names them (a chest
    radiograph: "modality CR is not one of ['MR']"). A sagittal or coronal slice is ignored: brain studies hold them.
    """
    if _text(ds, "Modality") != "MR":
        return "read", None
    body_part = _text(ds, "BodyPartExamined")
    if body_part and body_part not in BRAIN_BODY_PARTS:
        return "problem", f"body part {body_part} is not {'/'.join(BRAIN_BODY_PARTS)}; this model reads brain MR only"
    plane = slice_plane(ds)
    if plane is None:
        return "problem", "no usable ImageOrientationPatient: cannot tell an axial from a sagittal or coronal slice"
    if plane != AXIAL:
        return "ignored", f"{plane} slice is not axial; only axial slices are read"
    return "read", None


@dataclass(frozen=True)
class ImageSelection:
    """Which images of a study a task's model reads.

    Args:
        modalities: the DICOM Modality values read (the full read rejects any other, naming it).
        verdict: header -> ("read" | "ignored" | "problem", reason or None).
        view: header -> what the result lists as the image's view ("PA", "axial", ...).
        description: what a study without one usable image lacks, e.g. "frontal chest radiograph (CR/DX, PA/AP)".
    """

    modalities: tuple
    verdict: Callable[[pydicom.Dataset], tuple]
    view: Callable[[pydicom.Dataset], str]
    description: str


CHEST_SELECTION = ImageSelection(
    FRONTAL_MODALITIES,
    selection_verdict,
    lambda ds: _text(ds, "ViewPosition"),
    "frontal chest radiograph (CR/DX, PA/AP)",
)
BRAIN_SELECTION = ImageSelection(
    tuple(sorted(BRAIN_MRI.modalities)),
    brain_selection_verdict,
    lambda ds: slice_plane(ds) or "",
    "axial brain MR slice (MR, axial)",
)
SELECTIONS = {CHEST_XRAY14.name: CHEST_SELECTION, BRAIN_MRI.name: BRAIN_SELECTION}


def selection_for(task) -> ImageSelection:
    """The image selection of a task (a TaskSpec or its name); raises naming the tasks that have one."""
    spec: TaskSpec = get_task(task)
    if spec.name not in SELECTIONS:
        raise ValueError(f"task {spec.name!r} has no inference image selection; tasks with one: {sorted(SELECTIONS)}")
    return SELECTIONS[spec.name]


def discover_studies(root: Path, selection: ImageSelection = CHEST_SELECTION) -> Discovery:
    """Group every file under root (one file, a study folder or a tree) by StudyInstanceUID, reading headers only;
    `selection` says which images are read."""
    plans: dict[str, StudyPlan] = {}
    unassigned = []
    for path in iter_dicom_files(root):
        try:
            ds = read_dataset(path, stop_before_pixels=True)
        except UnreadableFile as e:
            unassigned.append(FileProblem(path, e.reason))
            continue
        study_uid = str(getattr(ds, "StudyInstanceUID", "") or "").strip()
        if not study_uid:
            unassigned.append(FileProblem(path, "no StudyInstanceUID; cannot tell which study it belongs to"))
            continue
        plan = plans.get(study_uid)
        if plan is None:
            plan = plans[study_uid] = StudyPlan(
                study_uid,
                str(getattr(ds, "PatientID", "") or ""),
                str(getattr(ds, "AccessionNumber", "") or "").strip(),
                str(getattr(ds, "StudyDate", "") or "").strip(),
            )
        verdict, reason = selection.verdict(ds)
        if verdict == "ignored":
            plan.ignored.append(FileProblem(path, reason))
        elif verdict == "problem":
            plan.problems.append(FileProblem(path, reason))
        else:
            sop = str(getattr(ds, "SOPInstanceUID", "") or "")
            plan.files.append(StudyFile(path, sop, selection.view(ds), selection.modalities))
    return Discovery(tuple(plans[k] for k in sorted(plans)), tuple(unassigned))


def read_study_file(file: StudyFile) -> StudyImage:
    """Decode one chosen file; raises UnusableDicomError naming the reason."""
    try:
        ds = read_dataset(file.path)
    except UnreadableFile as e:
        raise UnusableDicomError(file.path, e.reason) from e
    return StudyImage(file, image_from_dataset(ds, file.path, file.modalities))


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


SKIPPED_CSV_HEADER = ("file", "status", "reason")


def task_image_datalist(root: str, task: str, skipped_csv: Optional[str] = None) -> list[dict]:
    """MONAI data list ``[{"image": path}, ...]`` of every decodable image under root that the task's model reads,
    in StudyInstanceUID then file order: the same selection scripts/infer makes (used by the exported bundle).

    Args:
        skipped_csv: where to write every file left out, with status "skipped" (unusable) or "ignored" (not for
            this model, e.g. a lateral view) and the reason, as infer reports them; None writes nothing.
    """
    selection = selection_for(task)
    discovery = discover_studies(Path(root), selection)
    out, left_out = [], [(p, "skipped") for p in discovery.unassigned]
    for plan in discovery.studies:
        images, problems = load_study(plan)
        out.extend({"image": str(im.file.path)} for im in images)
        left_out += [(p, "skipped") for p in list(plan.problems) + problems] + [(p, "ignored") for p in plan.ignored]
    if skipped_csv:
        import csv

        Path(skipped_csv).parent.mkdir(parents=True, exist_ok=True)
        with open(skipped_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SKIPPED_CSV_HEADER)
            writer.writerows((str(p.path), status, p.reason) for p, status in left_out)
    if not out:
        raise ValueError(f"no usable {selection.description} under {root}")
    return out


def frontal_image_datalist(root: str, skipped_csv: Optional[str] = None) -> list[dict]:
    """task_image_datalist for the chest model (the name bundles exported before the brain task refer to)."""
    return task_image_datalist(root, CHEST_XRAY14.name, skipped_csv)
