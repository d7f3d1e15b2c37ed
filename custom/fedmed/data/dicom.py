"""Reading chest radiographs from DICOM study folders.

Orientation: we return arrays as (rows, columns), i.e. pydicom's ``pixel_array`` orientation. MONAI's
``PydicomReader`` returns (columns, rows); :func:`load_with_monai` transposes it back so both paths agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

# SOP classes that hold no image we can classify (structured reports, presentation states, RT objects).
NON_IMAGE_MODALITIES = {"SR", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "KO", "REG", "SEG", "DOC"}
PROJECTION_MODALITIES = {"DX", "CR", "DR", "RG"}


class UnusableDicomError(ValueError):
    """A file that is not a usable 2-D greyscale projection radiograph; the message says which file and why.

    ``reason`` alone (without the path, which may hold patient names) is what goes into logs and the database.
    """

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader workers despite the two-argument constructor
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class DicomHeader:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    modality: str


def read_header(path: Path) -> DicomHeader:
    """Read identifiers without pixel data; raises UnusableDicomError for non-DICOM files."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as e:
        raise UnusableDicomError(path, f"not a readable DICOM file ({e})") from e
    sop = getattr(ds, "SOPInstanceUID", None)
    if not sop:
        raise UnusableDicomError(path, "DICOM file has no SOPInstanceUID")
    return DicomHeader(Path(path), str(sop), str(getattr(ds, "StudyInstanceUID", "")), str(getattr(ds, "Modality", "")))


def check_usable(ds: pydicom.Dataset, path: Path, allowed_modalities=PROJECTION_MODALITIES) -> None:
    """Raise UnusableDicomError naming the reason if ds is not a 2-D greyscale image of an allowed modality."""
    modality = str(getattr(ds, "Modality", ""))
    if modality in NON_IMAGE_MODALITIES:
        raise UnusableDicomError(path, f"modality {modality} is not an image (structured report/presentation/RT)")
    if "PixelData" not in ds:
        raise UnusableDicomError(path, "no pixel data")
    if allowed_modalities and modality not in allowed_modalities:
        raise UnusableDicomError(path, f"modality {modality or '(missing)'} is not one of {sorted(allowed_modalities)}")
    photometric = str(getattr(ds, "PhotometricInterpretation", ""))
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnusableDicomError(path, f"colour image ({photometric}); a greyscale radiograph is required")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnusableDicomError(path, f"{frames} frames; a single 2-D image is required")


def read_dicom_image(path: Path, allowed_modalities=PROJECTION_MODALITIES) -> np.ndarray:
    """Return the image as float32 (rows, cols) with RescaleSlope/Intercept applied and MONOCHROME1 inverted, so
    that bright always means dense. Raises UnusableDicomError with the reason for anything unusable."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as e:
        raise UnusableDicomError(path, f"not a readable DICOM file ({e})") from e
    return image_from_dataset(ds, path, allowed_modalities)


def image_from_dataset(ds: pydicom.Dataset, path: Path, allowed_modalities=PROJECTION_MODALITIES) -> np.ndarray:
    """read_dicom_image for a dataset already read (with its pixel data); path only names it in errors."""
    check_usable(ds, path, allowed_modalities)
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        ts = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = ts.name if ts is not None else "unknown"
        raise UnusableDicomError(path, f"cannot decode transfer syntax {name} (no decoder installed: {e})") from e
    except (ValueError, EOFError) as e:
        raise UnusableDicomError(path, f"pixel data is truncated or corrupt ({e})") from e
    if pixels.ndim != 2:
        raise UnusableDicomError(path, f"pixel array has shape {pixels.shape}; a 2-D image is required")
    image = apply_rescale(pixels.astype(np.float32), ds).astype(np.float32)
    return invert_if_monochrome1(image, ds)


def invert_if_monochrome1(image: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """MONOCHROME1 stores bright as low values; invert within the representable (rescaled) range, so the result does
    not depend on this image's content."""
    if str(getattr(ds, "PhotometricInterpretation", "")) != "MONOCHROME1":
        return image
    bits = int(getattr(ds, "BitsStored", 16))
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    lo, hi = intercept, (2**bits - 1) * slope + intercept
    return (lo + hi) - image


def iter_dicom_files(root: Path) -> Iterator[Path]:
    """All files under root at any depth (hospital exports often have no .dcm suffix), sorted for determinism;
    DICOMDIR index files and hidden files are skipped."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"DICOM folder does not exist: {root}")
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield Path(dirpath) / name


def load_with_monai(path: Path) -> np.ndarray:
    """Load through MONAI's PydicomReader and return it in our (rows, cols) orientation, bright = dense.

    PydicomReader applies the rescale but returns (cols, rows) and leaves MONOCHROME1 as stored; we transpose and
    invert the same way read_dicom_image does. Used to check both readers agree.
    """
    from monai.transforms import LoadImage

    image = LoadImage(reader="PydicomReader", image_only=True)(str(path))
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    arr = arr.T
    return invert_if_monochrome1(arr, pydicom.dcmread(path, stop_before_pixels=True))
