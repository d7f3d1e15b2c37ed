"""The PACS round trip over DICOMweb against a real Orthanc: studies uploaded as a modality would send them are found
(QIDO-RS by date range, modality, StudyInstanceUID), retrieved (WADO-RS), inferred, and their Structured Report and
Grad-CAM Secondary Capture stored back (STOW-RS) and read back from Orthanc and checked."""

import importlib.util
import json
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from fedmed.data.synthetic import ScannerProfile, acquire, make_dicom, render_chest
from fedmed.inference.dicom_out import read_structured_report
from fedmed.inference.model_file import META_THRESHOLDS, write_model_file
from fedmed.inference.pacs import StudyQuery
from fedmed.inference.pseudonym import ENV_PSEUDONYM_KEY
from fedmed.job.constants import CXR14_FINDINGS
from fedmed.models.network import build_densenet121

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
KEY = "test-site-secret-0123456789"


def _infer_main():
    spec = importlib.util.spec_from_file_location("infer_cli", REPO / "scripts" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs a study UID, a date range or a modality"),  # never the whole PACS
        ({"date_from": "2026-01-01"}, "date_from must be a date YYYYMMDD"),
        ({"modality": "cr; DROP"}, "modality must be a DICOM modality code"),
    ],
)
def test_bad_pacs_queries_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StudyQuery(**kwargs)


def test_query_filters():
    assert StudyQuery(date_from="20260101", modality="CR").filters() == {
        "StudyDate": "20260101-",
        "ModalitiesInStudy": "CR",
    }


def test_an_unreachable_pacs_is_one_clear_error(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    model = tmp_path / "m.pt"
    torch.manual_seed(0)
    write_model_file(model, build_densenet121(14).state_dict(), {"round": 1, "image_size": SIZE})
    monkeypatch.setenv(ENV_PSEUDONYM_KEY, KEY)
    status = _infer_main()(
        [
            "--model",
            str(model),
            "--out",
            str(tmp_path / "out"),
            "--dicomweb",
            f"http://127.0.0.1:{port}/dicom-web",
            "--modality",
            "CR",
            "--threads",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2 and f"cannot reach the PACS at http://127.0.0.1:{port}/dicom-web (QIDO-RS study search)" in err


def _study_file(
    folder: Path, name: str, study_uid: str, date: str, view: str, seed: int, scanner=ScannerProfile()
) -> Path:
    rng = np.random.default_rng(seed)
    pixels = acquire(render_chest([0] * 14, rng, SIZE), scanner, rng)
    ds = make_dicom(
        pixels,
        scanner,
        f"PAT{seed}",
        study_uid,
        generate_uid(),
        generate_uid(),
        {"BodyPartExamined": "CHEST", "ViewPosition": view},
        "hospital-x",
    )
    ds.StudyDate = date
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


@pytest.mark.integration
def test_pacs_round_trip_query_infer_and_results_back(tmp_path, orthanc, monkeypatch, capsys):
    from dicomweb_client.api import DICOMwebClient

    from test_inference import _card_meta

    a, b, c = generate_uid(), generate_uid(), generate_uid()
    src = tmp_path / "modality"
    files = [
        _study_file(src / "a", "1", a, "20260110", "PA", 1),
        _study_file(src / "a", "2", a, "20260110", "LL", 2),
        _study_file(src / "b", "1", b, "20260120", "AP", 3, ScannerProfile("CR", "MONOCHROME1")),
        _study_file(src / "c", "1", c, "20250101", "PA", 4),
    ]  # outside the date range: not fetched
    for f in files:
        orthanc.upload(f)
    torch.manual_seed(0)
    model = tmp_path / "synthetic.pt"
    thresholds = {f: 1.0 for f in CXR14_FINDINGS}
    thresholds["Effusion"] = 0.0  # Effusion positive for every study: an overlay and a Secondary Capture each
    write_model_file(
        model,
        build_densenet121(14).state_dict(),
        {"round": 2, "image_size": SIZE, "model_card": _card_meta(True), META_THRESHOLDS: thresholds},
    )

    monkeypatch.setenv(ENV_PSEUDONYM_KEY, KEY)
    out = tmp_path / "out"
    status = _infer_main()(
        [
            "--model",
            str(model),
            "--out",
            str(out),
            "--dicomweb",
            orthanc.dicomweb_url,
            "--study-date",
            "20260101-20260131",
            "--threads",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "2 study(ies) found, 3 instance(s) retrieved, 4 result object(s) stored back" in printed
    assert "NOT FOR CLINICAL USE: trained on synthetic data" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["studies"] == 2 and summary["images_read"] == 2 and len(summary["ignored_files"]) == 1

    client = DICOMwebClient(orthanc.dicomweb_url)
    for study in (a, b):
        result = json.loads((out / "studies" / study / "result.json").read_text())
        series = {
            s["00080060"]["Value"][0]: s["0020000E"]["Value"][0]
            for s in client.search_for_series(study_instance_uid=study)
        }
        assert {"SR", "OT"} <= set(series)
        sr = client.retrieve_series(study_instance_uid=study, series_instance_uid=series["SR"])
        assert len(sr) == 1 and sr[0].SOPClassUID.name == "Comprehensive 3D SR Storage"
        said = read_structured_report(sr[0])
        assert said["probabilities"] == pytest.approx(result["probabilities"], abs=1e-6)
        assert said["thresholds"] == pytest.approx(thresholds, abs=1e-6)
        assert said["evaluations"]["Effusion"] == "Present" and said["evaluations"]["Mass"] == "Absent"
        assert said["evaluations"]["Clinical use"] == "Not for clinical use"
        assert result["clinical_use_warning"] in said["texts"]
        sc = client.retrieve_series(study_instance_uid=study, series_instance_uid=series["OT"])
        assert len(sc) == 1 and sc[0].SOPClassUID.name == "Secondary Capture Image Storage"
        assert sc[0].pixel_array.ndim == 3 and sc[0].pixel_array.shape[2] == 3
        assert (
            sc[0].DerivationDescription.startswith("NOT FOR CLINICAL USE") and "Effusion" in sc[0].DerivationDescription
        )
        source = pydicom.dcmread(next(f for f in files if pydicom.dcmread(f).StudyInstanceUID == study))
        assert sc[0].SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc[0].PatientID == source.PatientID and sr[0].PatientID == source.PatientID
    assert client.search_for_series(study_instance_uid=c) and not any(
        s["00080060"]["Value"][0] == "SR" for s in client.search_for_series(study_instance_uid=c)
    )

    # Again, by StudyInstanceUID: fedmed's own SR and overlay in the study are not read back as input.
    again = tmp_path / "again"
    status = _infer_main()(
        [
            "--model",
            str(model),
            "--out",
            str(again),
            "--dicomweb",
            orthanc.dicomweb_url,
            "--study-uid",
            a,
            "--no-send",
            "--threads",
            "1",
        ]
    )
    assert status == 0
    first = json.loads((out / "studies" / a / "result.json").read_text())
    second = json.loads((again / "studies" / a / "result.json").read_text())
    assert second["probabilities"] == pytest.approx(first["probabilities"], abs=1e-6)
    assert second["skipped_files"] == [] and len(second["images"]) == 1
