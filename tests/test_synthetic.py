import hashlib

import numpy as np
import pydicom
import pytest

from fedmed.data.synthetic import (
    CXR14_PREVALENCE,
    DEFAULT_HOSPITALS,
    HospitalSpec,
    ScannerProfile,
    SiteSplit,
    generate_hospitals,
    render_chest,
    sample_labels,
    site_prevalences,
)
from fedmed.job.constants import CXR14_FINDINGS


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.dcm")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(pydicom.dcmread(p).PixelData)
    for p in sorted(root.rglob("labels.csv")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic(tmp_path):
    specs = [HospitalSpec("h1", 5, DEFAULT_HOSPITALS[0].scanner), HospitalSpec("h2", 4, DEFAULT_HOSPITALS[1].scanner)]
    generate_hospitals(tmp_path / "a", specs, num_test=3, seed=3, size=64)
    generate_hospitals(tmp_path / "b", specs, num_test=3, seed=3, size=64)
    generate_hospitals(tmp_path / "c", specs, num_test=3, seed=4, size=64)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_generated_dicom_carries_the_tags_a_pacs_would(tiny_hospitals):
    ds = pydicom.dcmread(next((tiny_hospitals / "hospital-b" / "dicom").rglob("*.dcm")))
    assert ds.Modality == "CR" and ds.PhotometricInterpretation == "MONOCHROME1"
    assert ds.BitsStored == 12 and ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
    assert float(ds.RescaleIntercept) == -512.0
    assert ds.pixel_array.max() <= 4095 and ds.pixel_array.shape == (96, 96)


@pytest.mark.parametrize("finding", CXR14_FINDINGS)
def test_every_finding_draws_a_visible_sign(finding):
    # Same anatomy stream, with and without the finding: the images must differ in a visible way.
    labels = np.zeros(len(CXR14_FINDINGS), int)
    normal = render_chest(labels, np.random.default_rng(5), 128)
    labels[CXR14_FINDINGS.index(finding)] = 1
    sick = render_chest(labels, np.random.default_rng(5), 128)
    assert np.abs(sick - normal).max() > 0.05


def test_cardiomegaly_widens_the_heart():
    widths = {}
    for flag in (0, 1):
        labels = np.zeros(len(CXR14_FINDINGS), int)
        labels[CXR14_FINDINGS.index("Cardiomegaly")] = flag
        img = render_chest(labels, np.random.default_rng(11), 256)
        row = img[int(0.66 * 256)]  # through the heart, below the hila
        widths[flag] = int((row > 0.57).sum())
    assert widths[1] > widths[0] * 1.2


def test_site_priors_are_non_iid_and_centred_on_the_floored_prior():
    a = site_prevalences(CXR14_PREVALENCE, 20.0, np.random.default_rng(1), min_prevalence=0.05)
    b = site_prevalences(CXR14_PREVALENCE, 20.0, np.random.default_rng(2), min_prevalence=0.05)
    assert a.shape == (14,) and not np.allclose(a, b)  # sites differ
    draws = np.stack([site_prevalences(CXR14_PREVALENCE, 20.0, np.random.default_rng(s), 0.05) for s in range(400)])
    hernia = CXR14_FINDINGS.index("Hernia")  # 0.2% in NIH, floored to 5%
    assert abs(draws[:, hernia].mean() - 0.05) < 0.01


def test_sampled_labels_follow_the_prevalence():
    labels = sample_labels(np.full(14, 0.3), 4000, np.random.default_rng(0))
    for f in ("Mass", "Nodule", "Hernia"):  # not raised by co-occurrence rules
        assert abs(labels[:, CXR14_FINDINGS.index(f)].mean() - 0.3) < 0.03


def test_co_occurrence_raises_atelectasis_with_effusion():
    prev = np.array([CXR14_PREVALENCE[f] for f in CXR14_FINDINGS])
    labels = sample_labels(prev, 20000, np.random.default_rng(0))
    eff, atel = CXR14_FINDINGS.index("Effusion"), CXR14_FINDINGS.index("Atelectasis")
    assert labels[labels[:, eff] == 1, atel].mean() > labels[labels[:, eff] == 0, atel].mean() + 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(modality="CT"), r"modality must be one of \['CR', 'DX', 'MR'\]"),  # projection radiographs or MR slices
        (dict(photometric="RGB"), "photometric"),
        (dict(gamma=10.0), "gamma"),
        (dict(rescale_slope=0.0), "rescale_slope"),
    ],
)
def test_scanner_profile_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScannerProfile(**kwargs)


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        generate_hospitals(tmp_path, DEFAULT_HOSPITALS, split=SiteSplit(val_fraction=1.5))
    with pytest.raises(ValueError, match="alpha"):
        site_prevalences(CXR14_PREVALENCE, 0.0, np.random.default_rng(0))
