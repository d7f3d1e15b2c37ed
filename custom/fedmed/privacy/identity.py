"""Who a privacy budget protects: a stable, pseudonymous identity for each image and each patient.

Pure core (no NVFlare). The lifetime ledger (fedmed.privacy.ledger) charges each round to the identities of the
images it read, not to the files' bytes: a dataset re-exported, re-tagged (one header edited), cut to a subset or
grown to a superset still composes with what its images and patients already spent.

Each image is named by up to three pseudonymous tokens, any one of which links it to an earlier charge:
  x: the sha256 of its decoded pixel values (shape and values, whatever the transfer syntax or file format);
  s: its DICOM SOPInstanceUID (survives a lossy re-encoding that changes the pixels);
  p: its patient: DICOM PatientID, or the patient id column of a CSV reader (ChestX-ray14's "Patient ID").
Tokens are HMAC-SHA256 of (kind, value) under the site's ledger key, cut to 64 bits: the ledger holds no UID,
no patient id and no pixel hash anyone without the key could look up, and a collision (about 1e-9 for a million
tokens) can only join two identities, i.e. charge more, never less.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

TOKEN_HEX = 16  # 64 bits of each HMAC
KINDS = {"pixels": "x", "sop": "s", "patient": "p", "named": "n"}


def pixel_digest(pixels: np.ndarray) -> str:
    """sha256 of an image's decoded values in one canonical form (shape, then little-endian int64 or float64), so
    the same pixels hash alike from a DICOM of any transfer syntax, a PNG, or another integer width."""
    arr = np.asarray(pixels)
    canon = arr.astype("<i8") if arr.dtype.kind in "iub" else arr.astype("<f8")
    h = hashlib.sha256(json.dumps(list(arr.shape)).encode())
    h.update(np.ascontiguousarray(canon).tobytes())
    return h.hexdigest()


def _clean(value) -> Optional[str]:
    text = str(value).strip() if value is not None else ""
    return text or None


def image_identifiers(path: Path, patient_id: Optional[str] = None) -> tuple[tuple[str, str], ...]:
    """The (kind, value) identifiers of one image file, in clear (never stored: see pseudonymise).

    A .png is read with Pillow (the ChestX-ray14 and manifest readers' images), anything else as DICOM, as
    fedmed.data.dataset.read_image does. patient_id: the reader's own patient column, where it has one."""
    path = Path(path)
    found = []
    if path.suffix.lower() == ".png":
        from PIL import Image

        try:
            with Image.open(path) as im:
                pixels = np.asarray(im)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the image to identify it for the privacy ledger ({e})") from e
    else:
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except (
            InvalidDicomError,
            OSError,
            EOFError,
            ValueError,
            AttributeError,
            NotImplementedError,
            RuntimeError,
        ) as e:
            raise ValueError(f"{path}: cannot decode the image to identify it for the privacy ledger ({e})") from e
        for kind, value in (("sop", ds.get("SOPInstanceUID")), ("patient", ds.get("PatientID"))):
            if _clean(value):
                found.append((kind, _clean(value)))
    found.append(("pixels", pixel_digest(pixels)))
    if _clean(patient_id):
        found.append(("patient", _clean(patient_id)))
    return tuple(dict.fromkeys(found))


def pseudonymise(identifiers: Iterable[tuple[str, str]], key: bytes) -> tuple[str, ...]:
    """Sorted tokens "<kind letter>:<16 hex>" of (kind, value) identifiers under the site's identity key."""
    out = set()
    for kind, value in identifiers:
        if kind not in KINDS:
            raise ValueError(f"identifier kind must be one of {sorted(KINDS)}, got {kind!r}")
        mac = hmac.new(key, f"{kind}\x00{value}".encode(), hashlib.sha256).hexdigest()[:TOKEN_HEX]
        out.add(f"{KINDS[kind]}:{mac}")
    return tuple(sorted(out))


@dataclass(frozen=True)
class IdentitySet:
    """The pseudonymous identities of every image a dataset holds: one sorted token tuple per image.

    digest: sha256 of the canonical list, which is how ledger entries name the set (its index file holds it)."""

    images: tuple[tuple[str, ...], ...]
    digest: str

    @classmethod
    def of(cls, images: Iterable[Iterable[str]]) -> "IdentitySet":
        norm = sorted({tuple(sorted(set(img))) for img in images})
        if not norm or any(not img for img in norm):
            raise ValueError("an identity set needs at least one image, each with at least one token")
        return cls(tuple(norm), hashlib.sha256(cls.canonical(norm)).hexdigest())

    @classmethod
    def named(cls, name: str) -> "IdentitySet":
        """A set standing for one opaque, caller-named dataset (no image identities: charges to it compose only
        with charges to the same name)."""
        if not name:
            raise ValueError("a named identity set needs a name")
        return cls.of([[f"n:{name}"]])

    @staticmethod
    def canonical(images) -> bytes:
        return json.dumps([list(img) for img in images], separators=(",", ":")).encode()

    def count(self, kind: str) -> int:
        """How many distinct tokens of this kind ("pixels", "sop", "patient") the set holds."""
        letter = KINDS[kind] + ":"
        return len({t for img in self.images for t in img if t.startswith(letter)})

    def describe(self) -> str:
        patients = self.count("patient")
        return f"{len(self.images)} image(s)" + (f", {patients} patient(s)" if patients else ", no patient ids")


def dataset_identities(images: Iterable[tuple[Path, Optional[str]]], key: bytes) -> IdentitySet:
    """The IdentitySet of (image path, patient id from the reader or None) pairs; reads and decodes each image once.
    Raises ValueError for no images or an image that cannot be decoded."""
    tokens = [pseudonymise(image_identifiers(path, patient), key) for path, patient in images]
    if not tokens:
        raise ValueError("dataset_identities: no images")
    return IdentitySet.of(tokens)
