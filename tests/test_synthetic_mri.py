"""Synthetic brain MR hospitals: real MR DICOM through the shared hospital machinery, one visible sign per class."""

import numpy as np
import pydicom
import pytest
from pydicom.uid import MRImageStorage

from fedmed.data.dicom import read_dicom_image
from fedmed.data.synthetic_mri import BRAIN_MRI_FAMILY, BRAIN_PRIOR, render_brain
from fedmed.job.tasks import BRAIN_CLASSES, BRAIN_MRI

NO_TUMOUR = BRAIN_CLASSES.index("no_tumour")
SIZE = 128


def _lesion(cls: str, seed: int):
    """The class's sign: where its image differs from the same head (same seed) without a tumour."""
    sick = render_brain(BRAIN_CLASSES.index(cls), np.random.default_rng(seed), SIZE)
    healthy = render_brain(NO_TUMOUR, np.random.default_rng(seed), SIZE)
    return sick, healthy, np.abs(sick - healthy) > 0.08


def _head_frame(healthy):
    """Centre and half-extent of the head (non-background pixels) in pixel units."""
    ys, xs = np.nonzero(healthy > 0.02)
    return ys.mean(), xs.mean(), (ys.max() - ys.min()) / 2, (xs.max() - xs.min()) / 2


def test_generated_sites_are_mr_dicom_with_per_site_scanners(tiny_brain_hospitals):
    seen = {}
    for site in ("hospital-a", "hospital-b", "hospital-c", "global_test"):
        path = next((tiny_brain_hospitals / site / "dicom").rglob("*.dcm"))
        ds = pydicom.dcmread(path)
        assert (
            ds.Modality == "MR" and ds.SOPClassUID == MRImageStorage and ds.PhotometricInterpretation == "MONOCHROME2"
        )
        assert ds.BodyPartExamined == "BRAIN" and ds.ScanningSequence == "SE" and ds.MRAcquisitionType == "2D"
        assert ds.BitsStored == 12 and ds.pixel_array.shape == (64, 64) and ds.pixel_array.max() <= 4095
        assert read_dicom_image(path, BRAIN_MRI.modalities).shape == (64, 64)  # the task's reader accepts it
        seen[site] = (float(ds.PixelSpacing[0]), float(ds.RescaleIntercept), float(ds.RescaleSlope))
    assert len(set(seen.values())) >= 3  # scanners differ between hospitals
    header = (tiny_brain_hospitals / "hospital-a" / "labels.csv").read_text().splitlines()[0]
    assert header == "SOPInstanceUID,StudyInstanceUID,split,label"


def test_site_class_priors_are_non_iid_dirichlet_draws():
    draws = np.stack(
        [
            np.bincount(BRAIN_MRI_FAMILY.site_labels(400, 20.0, np.random.default_rng(s)), minlength=4) / 400
            for s in range(200)
        ]
    )
    assert np.abs(draws.mean(axis=0) - BRAIN_PRIOR).max() < 0.02  # centred on the global prior
    assert draws.std(axis=0).min() > 0.05  # but each site has its own mix
    with pytest.raises(ValueError, match="alpha must be > 0"):
        BRAIN_MRI_FAMILY.site_labels(10, 0.0, np.random.default_rng(0))


def test_no_tumour_has_no_lesion_and_every_tumour_draws_one():
    for seed in range(4):
        a = render_brain(NO_TUMOUR, np.random.default_rng(seed), SIZE)
        b = render_brain(NO_TUMOUR, np.random.default_rng(seed), SIZE)
        assert np.array_equal(a, b)  # deterministic
        for cls in ("glioma", "meningioma", "pituitary"):
            assert _lesion(cls, seed)[2].sum() > 10, (cls, seed)


@pytest.mark.parametrize("seed", range(5))
def test_pituitary_mass_sits_on_the_midline_in_front_of_the_ventricles(seed):
    _, healthy, mask = _lesion("pituitary", seed)
    cy, cx, ry, rx = _head_frame(healthy)
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - cx) < 0.15 * rx  # midline
    assert ys.mean() < cy  # anterior half (image top), at the skull base level of the sella


@pytest.mark.parametrize("seed", range(5))
def test_meningioma_is_round_bright_and_against_the_skull(seed):
    sick, healthy, mask = _lesion("meningioma", seed)
    cy, cx, ry, rx = _head_frame(healthy)
    ys, xs = np.nonzero(mask)
    # The lesion's outermost pixel reaches the inner skull (normalised elliptical radius close to the brain edge).
    radius = np.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
    assert radius.max() > 0.8
    assert sick[mask].mean() > healthy[mask].mean()  # brighter than the tissue it displaces


@pytest.mark.parametrize("seed", range(5))
def test_glioma_is_an_irregular_intra_axial_mass_in_one_hemisphere(seed):
    _, healthy, mask = _lesion("glioma", seed)
    cy, cx, ry, rx = _head_frame(healthy)
    ys, xs = np.nonzero(mask)
    assert abs(xs.mean() - cx) > 0.1 * rx  # off the midline, inside a hemisphere
    radius = np.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
    assert np.median(radius) < 0.8  # intra-axial: mostly well inside the brain


def test_render_rejects_an_unknown_class():
    with pytest.raises(ValueError, match=r"label must be a class index in \[0, 4\), got 7"):
        render_brain(7, np.random.default_rng(0), 64)
