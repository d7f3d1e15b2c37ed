"""Compressed DICOM as PACS exports hold it: JPEG 2000 (lossless), JPEG Lossless (process 14 SV1), JPEG-LS lossless
and RLE copies of synthetic studies are decoded by the pinned pydicom plugins and give the uncompressed
probabilities (lossless encodings: the same pixels, so within 1e-3 and in fact equal)."""

import numpy as np
import pydicom
import pytest
import torch
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid

from fedmed.data.synthetic import ScannerProfile, acquire, make_dicom, render_chest
from fedmed.inference.model_file import write_model_file
from fedmed.inference.run import InferenceOptions, run_inference
from fedmed.models.network import build_densenet121
from jpeg_lossless import encode_jpeg_lossless

SIZE = 64


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    scanners = [ScannerProfile(), ScannerProfile("CR", "MONOCHROME1", rescale_intercept=-512.0)]
    for n, scanner in enumerate(scanners):
        rng = np.random.default_rng(n)
        pixels = acquire(render_chest([0, 0, 1] + [0] * 11, rng, SIZE), scanner, rng)
        ds = make_dicom(
            pixels,
            scanner,
            f"P{n}",
            generate_uid(),
            generate_uid(),
            generate_uid(),
            {"BodyPartExamined": "CHEST", "ViewPosition": "PA"},
            "hospital-x",
        )
        ds.save_as(root / f"IM{n}", enforce_file_format=True)
    return root


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m.pt"
    write_model_file(path, build_densenet121(14).state_dict(), {"round": 1, "image_size": SIZE})
    return path


OPTIONS = dict(pseudonym_key=b"k" * 16, heatmaps=False)


@pytest.fixture(scope="module")
def plain_results(tmp_path_factory, uncompressed, model_path):
    """The uncompressed studies' results, once for every syntax."""
    out = tmp_path_factory.mktemp("plain_out")
    return run_inference(uncompressed, model_path, InferenceOptions(out_dir=out, **OPTIONS)).results


def _compress(ds: pydicom.Dataset, syntax) -> None:
    if syntax == JPEGLosslessSV1:  # no encoder in pydicom/pylibjpeg/Pillow: tests/jpeg_lossless.py
        frame = encode_jpeg_lossless(ds.pixel_array, ds.BitsStored)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)  # pydicom's encoders: RLE (its own), JPEG 2000 (pylibjpeg-openjpeg), JPEG-LS (pyjpegls)


@pytest.mark.parametrize(
    "syntax",
    [JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless],
    ids=["jpeg2000-lossless", "jpeg-lossless-sv1", "jpeg-ls-lossless", "rle"],
)
def test_compressed_copies_give_the_uncompressed_probabilities(
    tmp_path, uncompressed, model_path, plain_results, syntax
):
    copies = tmp_path / "compressed"
    copies.mkdir()
    for f in sorted(uncompressed.iterdir()):
        ds = pydicom.dcmread(f)
        original = ds.pixel_array.copy()
        _compress(ds, syntax)
        ds.save_as(copies / f.name, enforce_file_format=True)
        back = pydicom.dcmread(copies / f.name)
        assert back.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(back.pixel_array, original)  # lossless: decoded pixels are the originals
    packed = run_inference(copies, model_path, InferenceOptions(out_dir=tmp_path / "packed", **OPTIONS))
    assert packed.exit_status == 0 and len(packed.results) == len(plain_results) == 2
    for a, b in zip(plain_results, packed.results):
        assert a.study_uid == b.study_uid
        assert np.allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-3, rtol=0)
