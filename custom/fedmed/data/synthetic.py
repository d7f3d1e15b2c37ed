"""Deterministic synthetic hospitals written as real DICOM.

No labelled chest X-ray data can be downloaded on our machines, so the demo and the tests generate hospitals:
procedural PA/AP radiographs (body, lungs with vascular markings, mediastinum, heart, ribs, spine) in which each of
the 14 ChestX-ray14 findings draws its own visible sign, written as 16-bit DICOM with per-site scanner differences,
plus a label CSV keyed by SOPInstanceUID. Everything is a pure function of the seed.

The hospital machinery (scanner profiles, DICOM writing, per-site non-IID label draws, the global test set) is
shared by every image family: an ImageFamily says how to render and label one kind of image. Chest radiographs are
defined here (`chest_family`); brain MR slices in fedmed.data.synthetic_mri.
"""

from __future__ import annotations

import csv
import datetime
import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ComputedRadiographyImageStorage, MRImageStorage
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from scipy.ndimage import gaussian_filter

from fedmed.job.constants import COL_SOP_UID, COL_SPLIT, COL_STUDY_UID, CXR14_FINDINGS

# NIH ChestX-ray14 prevalences (fraction of images with the finding), from Data_Entry_2017.
CXR14_PREVALENCE = {
    "Atelectasis": 0.103,
    "Cardiomegaly": 0.025,
    "Effusion": 0.119,
    "Infiltration": 0.177,
    "Mass": 0.052,
    "Nodule": 0.056,
    "Pneumonia": 0.013,
    "Pneumothorax": 0.047,
    "Consolidation": 0.042,
    "Edema": 0.021,
    "Emphysema": 0.022,
    "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030,
    "Hernia": 0.002,
}
# Co-occurrence seen in ChestX-ray14: P(b | a) raised to at least this value.
CO_OCCURRENCE = (("Effusion", "Atelectasis", 0.30), ("Edema", "Cardiomegaly", 0.25), ("Pneumonia", "Infiltration", 0.40))


SOP_CLASS_OF_MODALITY = {"DX": DigitalXRayImageStorageForPresentation, "CR": ComputedRadiographyImageStorage,
                         "MR": MRImageStorage}


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's detector turns attenuation into stored pixels."""

    modality: str = "DX"  # DX, CR or MR
    photometric: str = "MONOCHROME2"  # MONOCHROME1 stores inverted grey levels
    gamma: float = 1.0
    contrast: float = 1.0
    noise_std: float = 0.015
    pixel_spacing_mm: float = 1.4
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    blur_sigma: float = 0.6

    def __post_init__(self):
        if self.modality not in SOP_CLASS_OF_MODALITY:
            raise ValueError(f"modality must be one of {sorted(SOP_CLASS_OF_MODALITY)}, got {self.modality!r}")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {self.photometric!r}")
        if not 0.3 <= self.gamma <= 3.0:
            raise ValueError(f"gamma must be in [0.3, 3], got {self.gamma}")
        if self.rescale_slope <= 0:
            raise ValueError(f"rescale_slope must be > 0, got {self.rescale_slope}")


@dataclass(frozen=True)
class HospitalSpec:
    """One synthetic hospital. prevalence: its own per-finding label prior (one value per class, in the family's
    label order) instead of a Dirichlet draw around the global prior (see specialist_priors)."""

    name: str
    num_images: int
    scanner: ScannerProfile = field(default_factory=ScannerProfile)
    prevalence: Optional[tuple] = None


DEFAULT_HOSPITALS = (
    HospitalSpec("hospital-a", 300, ScannerProfile("DX", "MONOCHROME2", 1.0, 1.0, 0.012, 1.4, 1.0, 0.0, 0.5)),
    HospitalSpec("hospital-b", 240, ScannerProfile("CR", "MONOCHROME1", 1.25, 0.9, 0.02, 1.6, 1.0, -512.0, 0.8)),
    HospitalSpec("hospital-c", 360, ScannerProfile("DX", "MONOCHROME2", 0.85, 1.1, 0.016, 1.2, 2.0, 0.0, 0.6)),
)
GLOBAL_TEST_SCANNER = ScannerProfile("DX", "MONOCHROME2", 1.05, 1.0, 0.015, 1.4, 1.0, 0.0, 0.6)


def site_prevalences(base: dict, alpha: float, rng: np.random.Generator, min_prevalence: float = 0.0) -> np.ndarray:
    """Per-site label priors: for each finding a Beta draw (a 2-category Dirichlet) centred on the global prevalence.

    Args:
        base: finding -> global prevalence.
        alpha: concentration; large = sites close to the global prior, small = strongly non-IID.
        min_prevalence: floor applied to the global prior first (demo-sized sites need positives of rare findings).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0.0 <= min_prevalence < 0.5:
        raise ValueError(f"min_prevalence must be in [0, 0.5), got {min_prevalence}")
    p = np.array([max(base[f], min_prevalence) for f in CXR14_FINDINGS])
    return np.clip(rng.beta(alpha * p, alpha * (1.0 - p)), 1e-4, 0.95)


def specialist_priors(n_sites: int, common: float, rare: float, num_classes: int = len(CXR14_FINDINGS)) -> list:
    """Per-site label priors of specialist hospitals: finding i is common (prevalence `common`) at site i % n_sites
    and rare (`rare`) at every other site, so each hospital alone sees few positives of most findings."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if not 0.0 <= rare <= common <= 0.95:
        raise ValueError(f"need 0 <= rare <= common <= 0.95, got rare={rare}, common={common}")
    return [tuple(common if i % n_sites == s else rare for i in range(num_classes)) for s in range(n_sites)]


def shift_scanner(scanner: ScannerProfile, reference: ScannerProfile, factor: float) -> ScannerProfile:
    """A scanner `factor` times as far from `reference` in gamma, contrast, noise and blur (1 = unchanged): larger
    per-hospital acquisition differences. Values are kept in the profile's valid range."""
    if factor < 0:
        raise ValueError(f"scanner shift factor must be >= 0, got {factor}")
    if factor == 1.0:
        return scanner  # exactly as given: default hospitals stay byte-identical

    def far(value, ref, lo, hi):
        return float(np.clip(ref + factor * (value - ref), lo, hi))

    return replace(
        scanner,
        gamma=far(scanner.gamma, reference.gamma, 0.3, 3.0),
        contrast=far(scanner.contrast, reference.contrast, 0.2, 3.0),
        noise_std=far(scanner.noise_std, reference.noise_std, 0.0, 0.2),
        blur_sigma=far(scanner.blur_sigma, reference.blur_sigma, 0.0, 4.0),
    )


def sample_labels(prevalence: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n multi-hot label vectors with the given per-finding prevalence and ChestX-ray14-like co-occurrence."""
    labels = (rng.random((n, len(CXR14_FINDINGS))) < prevalence).astype(np.uint8)
    idx = {f: i for i, f in enumerate(CXR14_FINDINGS)}
    for a, b, p_b_given_a in CO_OCCURRENCE:
        has_a = labels[:, idx[a]] == 1
        extra = has_a & (rng.random(n) < p_b_given_a)
        labels[extra, idx[b]] = 1
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Rendering. Coordinates are in [0, 1] (y down, x right); the image is PA, so the patient's left is image right.
# ---------------------------------------------------------------------------------------------------------------


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _soft(d, edge=0.15):
    """1 inside an ellipse-distance d < 1, smooth fall-off over `edge`."""
    return np.clip((1.0 + edge - d) / edge, 0.0, 1.0) if edge > 0 else (d < 1).astype(np.float32)


def _blob(yy, xx, cy, cx, sigma):
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)))


def render_chest(labels: Sequence[int], rng: np.random.Generator, size: int = 256, sign_scale: float = 1.0) -> np.ndarray:
    """Render one radiograph as attenuation in [0, 1] (bright = dense) with the signs of the given findings.
    sign_scale multiplies the contrast of the lesion signs (nodule, mass, patches, lines, rims; < 1 = fainter, harder
    to learn); the shape signs (heart size, fluid level, hyperinflation, collapsed lung) are unchanged."""
    if sign_scale < 0:
        raise ValueError(f"sign_scale must be >= 0, got {sign_scale}")
    if len(labels) != len(CXR14_FINDINGS):
        raise ValueError(f"labels must have {len(CXR14_FINDINGS)} entries, got {len(labels)}")
    has = {f: bool(labels[i]) for i, f in enumerate(CXR14_FINDINGS)}
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    u = rng.uniform

    # Patient anatomy (varies per image: pose, build, inspiration).
    cx = 0.5 + u(-0.025, 0.025)
    tw = u(0.33, 0.40)  # thorax half-width
    top = u(0.13, 0.19)
    bottom = u(0.72, 0.80)
    if has["Emphysema"]:
        bottom += u(0.04, 0.07)  # hyperinflation, flattened diaphragm
    lung_rx = tw * u(0.40, 0.46)
    lung_ry = (bottom - top) / 2
    lung_cy = (top + bottom) / 2
    lung_dx = tw * u(0.50, 0.56)

    img = np.full((size, size), 0.04, np.float32)
    body = _soft(_ellipse(yy, xx, 0.56, cx, 0.56, tw + 0.07), 0.05)
    img += 0.40 * body

    # Lungs: left image side = patient's right lung. Each lung may lose volume (atelectasis raises its base).
    lungs = []
    for side in (-1, 1):
        ry, cy = lung_ry, lung_cy
        if has["Atelectasis"] and side == -1:
            ry -= u(0.02, 0.04)
            cy -= u(0.01, 0.03)
        d = _ellipse(yy, xx, cy, cx + side * lung_dx, ry, lung_rx * (1.0 + 0.25 * (yy - top)))
        lungs.append(_soft(d, 0.06) * (yy > top - 0.02))
    lung = np.clip(lungs[0] + lungs[1], 0, 1)
    lung_value = 0.27 if has["Emphysema"] else 0.34
    markings = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), size / 90)
    markings *= 0.05 / (markings.std() + 1e-6)
    if has["Emphysema"]:
        markings *= 0.5
    img = img * (1 - lung) + lung * (0.44 - lung_value + 0.04 + markings)

    # Mediastinum, spine, heart.
    med = _soft(np.abs(xx - cx) / 0.055, 0.2) * (yy > 0.05) * (yy < bottom)
    img = np.maximum(img, 0.55 * med)
    img += 0.12 * _soft(np.abs(xx - cx) / 0.022, 0.3) * (yy > 0.02)
    ctr = u(0.55, 0.66) if has["Cardiomegaly"] else u(0.36, 0.46)
    heart_rx = ctr * tw  # cardiothoracic ratio = 2 * heart_rx / (2 * tw)
    heart_cx = cx + 0.25 * heart_rx
    heart = _soft(_ellipse(yy, xx, bottom - 0.10, heart_cx, 0.13, heart_rx), 0.08) * (yy < bottom + 0.02)
    img = np.maximum(img, 0.58 * heart)

    # Ribs: arcs across each hemithorax.
    rib_phase = u(0, 0.02)
    for k in range(10):
        y0 = top - 0.02 + rib_phase + k * (bottom - top) / 9.0
        arc = y0 + 0.10 * ((xx - cx) / tw) ** 2
        img += 0.06 * np.exp(-(((yy - arc) / 0.008) ** 2)) * body * (np.abs(xx - cx) > 0.04)

    lung_r, lung_l = lungs
    def pick_lung():
        return lung_r if rng.random() < 0.5 else lung_l

    def point_in(mask):
        ys, xs = np.nonzero(mask > 0.9)
        if len(ys) == 0:
            return lung_cy, cx
        j = rng.integers(len(ys))
        return (ys[j] + 0.5) / size, (xs[j] + 0.5) / size

    lesion = np.zeros_like(img)
    if has["Nodule"]:
        for _ in range(rng.integers(1, 3)):
            cy_, cx_ = point_in(lung)
            lesion += u(0.16, 0.28) * _soft(_ellipse(yy, xx, cy_, cx_, r := u(0.012, 0.022), r), 0.3)
    if has["Mass"]:
        cy_, cx_ = point_in(lung)
        r = u(0.045, 0.075)
        lesion += u(0.2, 0.32) * _soft(_ellipse(yy, xx, cy_, cx_, r * u(0.8, 1.2), r), 0.25)
    if has["Infiltration"]:
        for _ in range(rng.integers(5, 10)):
            cy_, cx_ = point_in(lung)
            lesion += u(0.07, 0.13) * _blob(yy, xx, cy_, cx_, u(0.018, 0.032))
    if has["Pneumonia"]:
        m = pick_lung()
        cy_, cx_ = point_in(m * (yy > lung_cy))
        patch = sum(_blob(yy, xx, cy_ + u(-0.05, 0.05), cx_ + u(-0.04, 0.04), u(0.03, 0.05)) for _ in range(5))
        lesion += u(0.10, 0.16) * np.clip(patch, 0, 1.5) * (1 + markings * 4) * m
    if has["Consolidation"]:
        m = pick_lung()
        cy_, cx_ = point_in(m)
        r = u(0.06, 0.09)
        lesion += u(0.24, 0.34) * _soft(_ellipse(yy, xx, cy_, cx_, r, r * u(0.7, 1.1)), 0.1) * m
    if has["Edema"]:
        amp = u(0.12, 0.2)
        for side in (-1, 1):
            lesion += amp * _blob(yy, xx, lung_cy + 0.02, cx + side * lung_dx * 0.7, u(0.07, 0.10)) * lung
    if has["Fibrosis"]:
        f = u(55, 75)
        net = np.abs(np.sin(f * xx + u(0, 6)) * np.sin(f * yy + u(0, 6))) ** 0.5
        lesion += u(0.09, 0.15) * net * lung * (yy > lung_cy - 0.05)
    if has["Atelectasis"]:
        y_band = lung_cy + u(0.05, 0.15)
        line = y_band + u(-0.25, 0.25) * (xx - (cx - lung_dx))
        lesion += u(0.2, 0.3) * np.exp(-(((yy - line) / 0.012) ** 2)) * lung_r
    if has["Effusion"]:
        m = pick_lung() if rng.random() < 0.7 else lung
        level = bottom - u(0.08, 0.14)
        meniscus = level - 0.12 * (np.abs(xx - cx) / tw) ** 2
        fluid = np.clip((yy - meniscus) / 0.02, 0, 1) * m
        img = img * (1 - fluid) + fluid * u(0.5, 0.58)
    if has["Pleural_Thickening"]:
        inner = gaussian_filter(lung, size * 0.012) > 0.97
        rim = np.clip(lung - inner, 0, 1)
        lesion += u(0.15, 0.25) * rim * (np.abs(xx - cx) > lung_dx * 0.8)
    if has["Pneumothorax"]:
        side = -1 if rng.random() < 0.5 else 1
        m = lung_r if side == -1 else lung_l
        # Collapsed lung edge: a curve inside the lung; lateral to it, no markings and darker.
        edge_x = cx + side * (lung_dx + lung_rx * u(0.0, 0.35))
        region = m * (side * (xx - edge_x) > 0) * (yy < lung_cy + u(0.0, 0.15))
        img -= region * (markings + u(0.05, 0.09))
        lesion += 0.18 * np.exp(-(((xx - edge_x) / 0.004) ** 2)) * m * (yy < lung_cy + 0.1)
    if has["Hernia"]:
        hy, hx = bottom - u(0.06, 0.1), cx - u(0.0, 0.04)
        lesion += u(0.18, 0.26) * _soft(_ellipse(yy, xx, hy, hx, 0.06, 0.07), 0.15)
        lesion -= 0.12 * _soft(_ellipse(yy, xx, hy - 0.015, hx, 0.02, 0.04), 0.2)  # air-fluid level in the sac
    img += sign_scale * lesion * body
    return np.clip(img, 0.0, 1.0)


def acquire(attenuation: np.ndarray, scanner: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Detector response: blur, exposure, gamma, contrast and quantum noise; returns stored 12-bit values."""
    img = gaussian_filter(attenuation, scanner.blur_sigma) if scanner.blur_sigma > 0 else attenuation
    exposure = rng.uniform(0.9, 1.1)
    img = np.clip(img * exposure, 0, 1) ** scanner.gamma
    img = np.clip(0.5 + (img - 0.5) * scanner.contrast, 0, 1)
    img = img + rng.normal(0, scanner.noise_std, img.shape) * np.sqrt(np.clip(img, 0.05, 1))
    physical = np.clip(img, 0, 1) * 3500.0
    if scanner.photometric == "MONOCHROME1":
        physical = 3500.0 - physical
    stored = np.round((physical - scanner.rescale_intercept) / scanner.rescale_slope)
    return np.clip(stored, 0, 4095).astype(np.uint16)


def make_dicom(
    pixels: np.ndarray,
    scanner: ScannerProfile,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    tags: Optional[dict] = None,
    institution: str = "",
) -> Dataset:
    """Wrap 12-bit stored pixels into a DX/CR/MR DICOM dataset with the tags a PACS would carry; `tags` adds the
    acquisition's own (BodyPartExamined, ViewPosition, MR sequence parameters, ...). One image a series, as the
    generated hospitals have: InstanceNumber 1."""
    sop_class = SOP_CLASS_OF_MODALITY[scanner.modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = scanner.modality
    ds.PatientID = patient_id
    ds.PatientName = f"SYNTHETIC^{patient_id}"
    ds.StudyDate = datetime.date(2026, 1, 1).strftime("%Y%m%d")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.InstitutionName = institution
    ds.Manufacturer = "fedmed-synthetic"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = scanner.photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [scanner.pixel_spacing_mm, scanner.pixel_spacing_mm]
    ds.RescaleSlope = scanner.rescale_slope
    ds.RescaleIntercept = scanner.rescale_intercept
    ds.WindowCenter = 1750
    ds.WindowWidth = 3500
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    return ds


@dataclass(frozen=True)
class ImageFamily:
    """What differs between synthetic image families; sites, scanners, DICOM writing and splits are shared.

    Args:
        name: the fedmed task these images serve (fedmed.job.tasks).
        render: (label, rng, size) -> image in [0, 1], bright = dense (X-ray) or high signal (MR).
        label_columns: label CSV columns after SOPInstanceUID, StudyInstanceUID, split.
        label_cells: label -> the CSV cells of those columns.
        site_labels: (n, alpha, rng) -> n labels from a site's own prior, drawn around the global one with
            Dirichlet concentration alpha (non-IID sites).
        labels_from_prior: (n, prevalence, rng) -> n labels from a given per-class prior (HospitalSpec.prevalence);
            None: the family takes no fixed priors.
        test_labels: (n, rng) -> n labels from the global prior (the global test set).
        tags: rng -> acquisition DICOM tags of one image (drawn after rendering and acquisition).
        hospitals: default sites.
        test_scanner: scanner of the global test set.
    """

    name: str
    render: Callable
    label_columns: tuple
    label_cells: Callable
    site_labels: Callable
    test_labels: Callable
    tags: Callable
    hospitals: tuple
    test_scanner: ScannerProfile
    labels_from_prior: Optional[Callable] = None


def _chest_tags(rng: np.random.Generator) -> dict:
    return {"BodyPartExamined": "CHEST", "ViewPosition": "PA" if rng.random() < 0.8 else "AP"}


def chest_family(min_prevalence: float = 0.05, sign_scale: float = 1.0) -> ImageFamily:
    """Chest radiographs with ChestX-ray14 findings; min_prevalence floors each finding's global prevalence;
    sign_scale: contrast of the lesion signs (render_chest)."""
    if sign_scale < 0:
        raise ValueError(f"sign_scale must be >= 0, got {sign_scale}")
    floored = np.array([max(CXR14_PREVALENCE[f], min_prevalence) for f in CXR14_FINDINGS])
    return ImageFamily(
        name="chest_xray14",
        render=render_chest if sign_scale == 1.0 else partial(render_chest, sign_scale=sign_scale),
        label_columns=CXR14_FINDINGS,
        label_cells=lambda label: [int(v) for v in label],
        site_labels=lambda n, alpha, rng: sample_labels(site_prevalences(CXR14_PREVALENCE, alpha, rng, min_prevalence), n, rng),
        test_labels=lambda n, rng: sample_labels(floored, n, rng),
        tags=_chest_tags,
        hospitals=DEFAULT_HOSPITALS,
        test_scanner=GLOBAL_TEST_SCANNER,
        labels_from_prior=lambda n, prevalence, rng: sample_labels(np.asarray(prevalence, dtype=float), n, rng),
    )


def write_site(
    out_dir: Path,
    labels: np.ndarray,
    splits: Sequence[str],
    scanner: ScannerProfile,
    rng: np.random.Generator,
    size: int = 256,
    *,
    progress: Optional[Callable[[int], None]] = None,
    family: Optional[ImageFamily] = None,
) -> Path:
    """Write one site's DICOM tree (patient/study/series/instance.dcm) and its labels.csv; returns the CSV path.
    The folder's name is the institution (InstitutionName, the PatientID prefix, the UIDs' entropy). family: what
    to render (default chest radiographs)."""
    family = family or chest_family()
    out_dir = Path(out_dir)
    institution = out_dir.name
    dicom_root = out_dir / "dicom"
    rows = []
    uid_root = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root
    for i, label in enumerate(labels):
        pid = f"{institution[:3].upper()}{i:05d}"
        study_uid = generate_uid(uid_root, entropy_srcs=[institution, pid, "study"])
        series_uid = generate_uid(uid_root, entropy_srcs=[institution, pid, "series"])
        sop_uid = generate_uid(uid_root, entropy_srcs=[institution, pid, "sop"])
        pixels = acquire(family.render(label, rng, size), scanner, rng)
        ds = make_dicom(pixels, scanner, pid, study_uid, series_uid, sop_uid, family.tags(rng), institution)
        path = dicom_root / pid / f"study_{i:05d}" / "series_1" / f"{sop_uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        rows.append([sop_uid, study_uid, splits[i], *family.label_cells(label)])
        if progress:
            progress(1)
    csv_path = out_dir / "labels.csv"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([COL_SOP_UID, COL_STUDY_UID, COL_SPLIT, *family.label_columns])
        w.writerows(rows)
    os.replace(tmp, csv_path)  # a half-written label file never looks complete
    return csv_path


@dataclass(frozen=True)
class SiteSplit:
    """alpha: Dirichlet concentration of each site's label prior around the global one (large = close to it, small
    = strongly non-IID); val_fraction: share of each site's images in its validation split."""

    alpha: float = 20.0
    val_fraction: float = 0.2


def generate_hospitals(
    out_root: Path,
    hospitals: Optional[Iterable[HospitalSpec]] = None,
    num_test: int = 300,
    seed: int = 0,
    size: int = 256,
    progress: Optional[Callable[[int], None]] = None,
    family: Optional[ImageFamily] = None,
    split: SiteSplit = SiteSplit(),
) -> dict:
    """Generate every hospital plus a global test set under out_root; returns {site: labels.csv path}.

    Each site gets its own Dirichlet label prior (non-IID) and scanner profile; the global test set uses the global
    prior. The same seed gives byte-identical pixel data and identical labels. family: what to render (default
    chest radiographs; chest_family(min_prevalence) floors rare findings); hospitals default to the family's.
    split: how each site's labels scatter around the global prior and how many of its images are validation.
    """
    family = family or chest_family()
    alpha, val_fraction = split.alpha, split.val_fraction
    hospitals = list(family.hospitals if hospitals is None else hospitals)
    if not hospitals:
        raise ValueError("at least one hospital is required")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if num_test < 1:
        raise ValueError(f"num_test must be >= 1, got {num_test}")
    out_root = Path(out_root)
    root_rng = np.random.default_rng(seed)
    site_seeds = root_rng.integers(0, 2**31, size=len(hospitals) + 1)
    written = {}
    for spec, s in zip(hospitals, site_seeds[:-1]):
        if spec.num_images < 2:
            raise ValueError(f"{spec.name}: num_images must be >= 2, got {spec.num_images}")
        rng = np.random.default_rng(s)
        if spec.prevalence is None:
            labels = family.site_labels(spec.num_images, alpha, rng)
        elif family.labels_from_prior is None:
            raise ValueError(f"{spec.name}: the {family.name} images take no per-site prevalence")
        elif len(spec.prevalence) != len(family.label_columns):
            raise ValueError(
                f"{spec.name}: prevalence has {len(spec.prevalence)} values, the {family.name} images have "
                f"{len(family.label_columns)} classes"
            )
        else:
            labels = family.labels_from_prior(spec.num_images, spec.prevalence, rng)
        n_val = max(1, int(round(spec.num_images * val_fraction)))
        splits = ["val" if i < n_val else "train" for i in rng.permutation(spec.num_images)]
        written[spec.name] = write_site(
            out_root / spec.name, labels, splits, spec.scanner, rng, size, progress=progress, family=family
        )
    rng = np.random.default_rng(site_seeds[-1])
    labels = family.test_labels(num_test, rng)
    written["global_test"] = write_site(
        out_root / "global_test", labels, ["test"] * num_test, family.test_scanner, rng, size, progress=progress, family=family
    )
    return written
