import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from fedmed.data.dataset import RadiographDataset
from fedmed.data.dicom import UnusableDicomError, iter_dicom_files, load_with_monai, read_dicom_image, read_header
from fedmed.data.labels import LabelledImage
from fedmed.data.synthetic import ScannerProfile, make_dicom


def _write(tmp_path, pixels, scanner=ScannerProfile(), name="img.dcm", **overrides):
    uid = generate_uid()
    ds = make_dicom(pixels.astype(np.uint16), scanner, "P1", generate_uid(), generate_uid(), uid)
    for k, v in overrides.items():
        setattr(ds, k, v)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _marker_image(rows=40, cols=64):
    # Non-square with a bright block at the top-left: any transpose or flip moves it.
    img = np.full((rows, cols), 500, np.uint16)
    img[2:8, 3:12] = 3000
    return img


@pytest.mark.parametrize(
    "scanner",
    [
        ScannerProfile(),  # MONOCHROME2, identity rescale
        ScannerProfile(photometric="MONOCHROME1", rescale_intercept=-512.0),  # inverted + offset
        ScannerProfile(rescale_slope=2.0, rescale_intercept=10.0),  # slope applied
    ],
)
def test_pydicom_and_monai_readers_agree(tmp_path, scanner):
    path = _write(tmp_path, _marker_image(), scanner)
    ours = read_dicom_image(path)
    monai = load_with_monai(path)
    assert ours.shape == (40, 64) == monai.shape
    np.testing.assert_allclose(ours, monai, rtol=1e-5, atol=1e-3)


def test_rescale_and_monochrome1_make_bright_mean_dense(tmp_path):
    img = _marker_image()
    m2 = read_dicom_image(_write(tmp_path, img, ScannerProfile(rescale_slope=2.0, rescale_intercept=10.0), "a.dcm"))
    assert m2[4, 5] == pytest.approx(3000 * 2 + 10)
    # MONOCHROME1 stores dense as low values: the same anatomy stored inverted reads back bright.
    m1 = read_dicom_image(_write(tmp_path, 4095 - img, ScannerProfile(photometric="MONOCHROME1"), "b.dcm"))
    assert m1[4, 5] > m1[30, 50]
    np.testing.assert_allclose(m1, img.astype(np.float32))


def test_dataset_keeps_rows_as_height(tmp_path):
    path = _write(tmp_path, _marker_image())
    ds = RadiographDataset([LabelledImage(path, np.zeros(14, np.float32))], image_size=32, train=False)
    image, labels = ds[0]
    assert image.shape == (1, 32, 32) and labels.shape == (14,)
    top_left = image[0, :8, :8].mean()
    assert top_left > image[0, 24:, 24:].mean() + 0.3  # the marker stayed top-left
    assert torch.all((image >= 0) & (image <= 1))


def _bare(tmp_path, name, **attrs):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = attrs.pop("ts", ExplicitVRLittleEndian)
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t: _bare(t, "sr.dcm", Modality="SR"), "not an image"),  # structured report
        (lambda t: _bare(t, "nopix.dcm", Modality="DX"), "no pixel data"),
        (lambda t: _write(t, _marker_image(), Modality="CT"), "modality CT"),  # wrong modality for chest model
        (lambda t: (t / "notes.txt").write_text("hello") and t / "notes.txt", "not a readable DICOM"),
    ],
)
def test_unusable_files_are_named_with_a_reason(tmp_path, make, match):
    with pytest.raises(UnusableDicomError, match=match):
        read_dicom_image(make(tmp_path))


def test_colour_image_is_rejected(tmp_path):
    path = _write(tmp_path, _marker_image())
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "RGB", 3
    ds.save_as(path)
    with pytest.raises(UnusableDicomError, match="colour image"):
        read_dicom_image(path)


def test_truncated_pixel_data_is_rejected(tmp_path):
    path = _write(tmp_path, _marker_image())
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path)
    with pytest.raises(UnusableDicomError, match="truncated or corrupt"):
        read_dicom_image(path)


def test_compressed_without_decoder_is_rejected(tmp_path):
    path = _write(tmp_path, _marker_image())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = RLELossless  # claims RLE; the bytes are not RLE: nothing can decode it
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    ds.save_as(path)
    with pytest.raises(UnusableDicomError, match="transfer syntax|truncated or corrupt"):
        read_dicom_image(path)


def test_folder_walk_finds_files_without_suffix_and_skips_dicomdir(tmp_path):
    (tmp_path / "p" / "s").mkdir(parents=True)
    a = _write(tmp_path / "p" / "s", _marker_image(), name="IM0001")  # no .dcm suffix, as PACS exports do
    (tmp_path / "DICOMDIR").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    assert list(iter_dicom_files(tmp_path)) == [a]
    assert read_header(a).sop_instance_uid
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_dicom_files(tmp_path / "nope"))
