"""Synthetic brain MR hospitals for the 4-class tumour task (glioma, meningioma, pituitary, no tumour).

Axial T1-weighted-like slices: scalp (bright fat), skull (dark cortical bone), brain with grey and white matter
(white brighter, as on T1), cortical sulci, a falx and the lateral ventricles (dark CSF). Each class draws its own
sign:
- glioma: an irregular intra-axial mass inside a hemisphere, heterogeneous (darker necrotic core, brighter rim)
  within a dark oedema halo, compressing the ventricle on its side;
- meningioma: a round, homogeneous, bright extra-axial mass with a broad base against the inner skull;
- pituitary: a round mass on the midline at the skull base (anterior to the ventricles, ringed by dark cistern CSF);
- no tumour: none.
Difficulty comes from varying size and contrast of the signs, head pose and size, ventricle size, an MR bias field
and look-alike distractors (small bright vessels, dark perivascular spaces). Written through the same hospital
machinery as the chest radiographs (fedmed.data.synthetic): Modality MR, MONOCHROME2, per-site scanner response.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from fedmed.data.synthetic import HospitalSpec, ImageFamily, ScannerProfile, _ellipse, _soft
from fedmed.job.tasks import BRAIN_CLASSES, COL_CLASS_LABEL

# Class prior of the global population (the public brain-tumour MRI collections are roughly balanced).
BRAIN_PRIOR = np.array([0.24, 0.24, 0.24, 0.28])

BRAIN_HOSPITALS = (
    HospitalSpec("hospital-a", 200, ScannerProfile("MR", "MONOCHROME2", 1.0, 1.0, 0.015, 0.9, 1.0, 0.0, 0.5)),
    HospitalSpec("hospital-b", 160, ScannerProfile("MR", "MONOCHROME2", 1.2, 0.9, 0.025, 1.0, 1.0, -1024.0, 0.8)),
    HospitalSpec("hospital-c", 240, ScannerProfile("MR", "MONOCHROME2", 0.85, 1.1, 0.02, 0.8, 2.0, 0.0, 0.6)),
)
BRAIN_TEST_SCANNER = ScannerProfile("MR", "MONOCHROME2", 1.05, 1.0, 0.02, 0.9, 1.0, 0.0, 0.6)


def render_brain(label: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One axial slice as signal in [0, 1] with the sign of class BRAIN_CLASSES[label]."""
    if not 0 <= int(label) < len(BRAIN_CLASSES):
        raise ValueError(f"label must be a class index in [0, {len(BRAIN_CLASSES)}), got {label}")
    cls = BRAIN_CLASSES[int(label)]
    u = rng.uniform
    ax = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy0, xx0 = np.meshgrid(ax, ax, indexing="ij")
    # Head pose: small in-plane rotation and offset; everything below is drawn in the head's own frame.
    cy, cx, a = 0.5 + u(-0.03, 0.03), 0.5 + u(-0.03, 0.03), u(-0.15, 0.15)
    yy = cy + (yy0 - cy) * np.cos(a) - (xx0 - cx) * np.sin(a)
    xx = cx + (yy0 - cy) * np.sin(a) + (xx0 - cx) * np.cos(a)
    ry, rx = u(0.40, 0.45), u(0.32, 0.37)  # head half-axes: longer front-to-back (y) than side-to-side (x)

    head = _soft(_ellipse(yy, xx, cy, cx, ry, rx), 0.02)
    inner_skull = _soft(_ellipse(yy, xx, cy, cx, ry - 0.03, rx - 0.03), 0.02)
    brain = _soft(_ellipse(yy, xx, cy, cx, ry - 0.045, rx - 0.045), 0.03)
    img = 0.6 * head  # scalp fat
    img = img * (1 - inner_skull) + 0.1 * inner_skull  # dark cortical bone (and the thin CSF under it)
    texture = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), size / 60)
    texture /= texture.std() + 1e-6
    white = _soft(_ellipse(yy, xx, cy, cx, (ry - 0.045) * 0.72, (rx - 0.045) * 0.68) + 0.25 * texture, 0.25)
    tissue = 0.45 + 0.17 * white  # grey matter, white matter brighter (T1)
    sulci = np.clip(1 - np.abs(texture) / 0.25, 0, 1) * (1 - white) * brain  # dark CSF lines in the cortex
    tissue = tissue - 0.18 * sulci
    falx = np.exp(-(((xx - cx) / 0.004) ** 2)) * brain
    tissue = tissue - 0.2 * falx
    img = img * (1 - brain) + brain * tissue

    # Lateral ventricles: a dark pair either side of the midline (size varies with age).
    vent_ry, vent_rx, vent_cy = u(0.08, 0.14), u(0.018, 0.035), cy + u(0.0, 0.04)
    # A glioma compresses and pushes the ventricle on its side. Every class draws the same numbers up to its own
    # sign, so one seed gives the same head with and without a lesion.
    side, push = (-1 if rng.random() < 0.5 else 1), u(0.01, 0.03)
    vent_shift = {-1: 0.0, 1: 0.0}
    if cls == "glioma":
        vent_shift[side] = push
    for s in (-1, 1):
        squeeze = 0.6 if vent_shift[s] else 1.0
        v = _soft(_ellipse(yy, xx, vent_cy, cx + s * (vent_rx + 0.012) - s * vent_shift[s], vent_ry, vent_rx * squeeze), 0.25)
        img = img * (1 - v) + 0.12 * v

    # Distractors every class has: small bright vessels and dark perivascular spaces.
    for _ in range(rng.integers(2, 6)):
        t, r = u(0, 2 * np.pi), np.sqrt(u(0.0, 0.7))
        py, px = cy + r * (ry - 0.08) * np.cos(t), cx + r * (rx - 0.08) * np.sin(t)
        rr = u(0.006, 0.014)
        img += (u(0.15, 0.3) if rng.random() < 0.5 else -u(0.1, 0.2)) * _soft(_ellipse(yy, xx, py, px, rr, rr), 0.3) * brain

    # Coil inhomogeneity: a smooth multiplicative bias field (drawn before the lesion, see `push` above).
    bias = 1 + 0.15 * (gaussian_filter(rng.standard_normal((8, 8)), 1.5) * 3).clip(-1, 1)
    bias = gaussian_filter(np.kron(bias, np.ones((size // 8 + 1, size // 8 + 1)))[:size, :size], size / 16)
    contrast = u(0.6, 1.0)  # how conspicuous this lesion is
    if cls == "glioma":
        r0 = u(0.045, 0.09)
        gy = cy + u(-0.15, 0.15)
        gx = cx + side * u(0.08, rx - 0.06 - r0 * 1.4)  # inside the hemisphere, clear of the skull
        theta = np.arctan2(yy - gy, xx - gx)
        wobble = sum(u(0.08, 0.2) * np.sin(k * theta + u(0, 2 * np.pi)) for k in (2, 3, 5))
        dist = np.sqrt((yy - gy) ** 2 + (xx - gx) ** 2) / (r0 * (1 + wobble))
        oedema = _soft(dist / 1.6, 0.3)
        mass = _soft(dist, 0.15)
        core = _soft(dist / 0.55, 0.3) * (rng.random() < 0.7)  # necrotic centre, most of the time
        img = img * (1 - 0.35 * contrast * oedema * brain)
        img = img * (1 - mass) + mass * (0.32 + 0.25 * contrast)  # irregular rim
        img -= 0.2 * contrast * core
    elif cls == "meningioma":
        r = u(0.04, 0.085)
        t = u(0, 2 * np.pi)
        # Centre just inside the inner skull, so the mass sits against it (extra-axial, broad dural base).
        ey, ex = (ry - 0.03) * np.cos(t), (rx - 0.03) * np.sin(t)
        scale = 1 - r * 0.8 / np.hypot(ey, ex)
        my, mx = cy + ey * scale, cx + ex * scale
        mass = _soft(_ellipse(yy, xx, my, mx, r, r), 0.12) * inner_skull
        img = img * (1 - mass) + mass * (0.55 + 0.3 * contrast)
    elif cls == "pituitary":
        r = u(0.025, 0.05)
        py, px = cy - u(0.12, 0.17), cx + u(-0.01, 0.01)
        cistern = _soft(_ellipse(yy, xx, py, px, r * 1.8, r * 2.2), 0.2)
        img = img * (1 - 0.6 * cistern) + 0.6 * cistern * 0.15  # suprasellar CSF around the gland
        mass = _soft(_ellipse(yy, xx, py, px, r * u(0.9, 1.2), r), 0.15)
        img = img * (1 - mass) + mass * (0.5 + 0.3 * contrast)

    return np.clip(img * bias * head, 0.0, 1.0).astype(np.float32)


def _site_labels(n: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    prior = rng.dirichlet(alpha * BRAIN_PRIOR)
    return rng.choice(len(BRAIN_CLASSES), size=n, p=prior)


def _mr_tags(rng: np.random.Generator) -> dict:
    """A T1 spin-echo axial slice, as an MR scanner would tag it."""
    return {"BodyPartExamined": "BRAIN", "ScanningSequence": "SE", "SequenceVariant": "NONE", "ScanOptions": "",
            "MRAcquisitionType": "2D", "RepetitionTime": 500.0, "EchoTime": 15.0, "SliceThickness": 5.0,
            "MagneticFieldStrength": 1.5 if rng.random() < 0.5 else 3.0, "ImageType": ["ORIGINAL", "PRIMARY", "M"],
            "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "SeriesDescription": "AX T1"}


BRAIN_MRI_FAMILY = ImageFamily(
    name="brain_mri",
    render=render_brain,
    label_columns=(COL_CLASS_LABEL,),
    label_cells=lambda label: [BRAIN_CLASSES[int(label)]],
    site_labels=_site_labels,
    test_labels=lambda n, rng: rng.choice(len(BRAIN_CLASSES), size=n, p=BRAIN_PRIOR),
    tags=_mr_tags,
    hospitals=BRAIN_HOSPITALS,
    test_scanner=BRAIN_TEST_SCANNER,
)
