"""Clinician inference: study selection, decisions by threshold, outputs (JSON/CSV/PNG/SC), the pseudonymised
inference log, bad inputs that do not stop the batch, threshold choice, the exported MONAI bundle, and the same run
for a brain MRI model (axial MR slices, softmax, the predicted class by argmax)."""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from fedmed.data.synthetic import ScannerProfile, acquire, make_dicom, render_chest, write_site
from fedmed.data.synthetic_mri import BRAIN_MRI_FAMILY, BRAIN_TEST_SCANNER, render_brain
from fedmed.inference.dicom_out import read_structured_report
from fedmed.inference.model_file import (
    META_THRESHOLD_METHOD,
    META_THRESHOLDS,
    choose_thresholds,
    file_sha256,
    read_model_file,
    write_model_file,
)
from fedmed.inference.predict import positive_findings
from fedmed.inference.pseudonym import ENV_PSEUDONYM_KEY, load_pseudonym_key, pseudonymise
from fedmed.inference.run import InferenceOptions, run_inference
from fedmed.inference.studies import brain_selection_verdict, selection_verdict
from fedmed.job import constants as C
from fedmed.job.constants import CXR14_FINDINGS
from fedmed.job.tasks import BRAIN_CLASSES
from fedmed.learning.metrics import youden_thresholds
from fedmed.models.network import build_densenet121
from fedmed.store.repository import InferenceRecord, Repository

REPO = Path(__file__).resolve().parents[1]
KEY = b"test-site-secret-0123456789"
SIZE = 64  # stored pixels and model input: tiny, to keep the suite fast


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A freshly initialised, seeded DenseNet-121 in the persistor's file format, without thresholds."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "global_model.pt"
    write_model_file(path, build_densenet121(14).state_dict(), {"round": 3, "image_size": SIZE})
    return path


def _dicom(
    folder: Path,
    name: str,
    patient: str,
    study_uid: str,
    view="PA",
    seed=0,
    labels=None,
    scanner=ScannerProfile(),
    **overrides,
) -> Path:
    rng = np.random.default_rng(seed)
    pixels = acquire(render_chest(labels if labels is not None else [0] * 14, rng, SIZE), scanner, rng)
    tags = {"BodyPartExamined": "CHEST", "ViewPosition": view}  # what make_dicom set itself before the MR task
    ds = make_dicom(pixels, scanner, patient, study_uid, generate_uid(), generate_uid(), tags, "hospital-x")
    for k, v in overrides.items():
        setattr(ds, k, v)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Two patients' studies: A has a PA and a lateral view, B one AP view (MONOCHROME1 CR)."""
    root = tmp_path_factory.mktemp("studies")
    a_uid, b_uid = generate_uid(), generate_uid()
    # folder names carry no identifier, so the outputs (which list file paths for the clinician) can be checked
    # A carries the hospital's accession number (B none): the clinician's local results show it
    _dicom(
        root / "p1" / "s1", "IM1", "PATA1", a_uid, "PA", seed=1, labels=[0, 0, 1] + [0] * 11, AccessionNumber="ACC-A1"
    )
    _dicom(root / "p1" / "s1", "IM2", "PATA1", a_uid, "LL", seed=2, AccessionNumber="ACC-A1")
    _dicom(
        root / "p2" / "s1",
        "IM1",
        "PATB2",
        b_uid,
        "AP",
        seed=3,
        scanner=ScannerProfile("CR", "MONOCHROME1", rescale_intercept=-512.0),
    )
    return {"root": root, "A": a_uid, "B": b_uid, "patients": {"A": "PATA1", "B": "PATB2"}}


def _record(out: Path) -> Path:
    """Where a test keeps the inference record of the results folder `out`: beside it, never inside."""
    return Path(out).parent / f"{Path(out).name}-record"


def _options(out, **kw):
    kw.setdefault("record_dir", _record(out))
    return InferenceOptions(out_dir=out, pseudonym_key=KEY, **kw)


def _logs(out: Path) -> list:
    return Repository(f"sqlite:///{_record(out) / 'fedmed.db'}").inference_logs()


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- pure pieces ------------------------------------------------------------------------------------------------


def test_youden_picks_the_threshold_that_separates_and_skips_one_class_findings():
    labels = np.array([[0, 0], [0, 0], [1, 0], [1, 0]])
    probs = np.array([[0.1, 0.3], [0.2, 0.1], [0.6, 0.9], [0.7, 0.2]])
    # finding a: 0.6 separates perfectly (J = 1); finding b has no positive, so no threshold
    assert youden_thresholds(labels, probs, ["a", "b"]) == {"a": pytest.approx(0.6)}
    with pytest.raises(ValueError, match="must both be"):
        youden_thresholds(labels, probs[:, :1], ["a", "b"])


def test_positive_findings_reach_their_own_threshold():
    probs = {"a": 0.30, "b": 0.30, "c": 0.90}
    # a: exactly at its threshold counts; b: same probability, higher threshold; c: below a high threshold
    assert positive_findings(probs, {"a": 0.30, "b": 0.31, "c": 0.95}) == ["a"]


def test_pseudonyms_are_keyed_and_the_key_must_be_real(tmp_path, monkeypatch):
    p = pseudonymise(KEY, "patient", "PATA1")
    assert len(p) == 64 and "PATA1" not in p
    assert p != pseudonymise(b"another-secret-0123456789", "patient", "PATA1")  # a different site cannot link
    assert p != pseudonymise(KEY, "study", "PATA1")  # namespaces do not collide
    monkeypatch.delenv(ENV_PSEUDONYM_KEY, raising=False)
    with pytest.raises(ValueError, match="no pseudonym key"):
        load_pseudonym_key()
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError, match="3 bytes; at least 16"):
        load_pseudonym_key(tmp_path / "short")
    monkeypatch.setenv(ENV_PSEUDONYM_KEY, KEY.decode())
    assert load_pseudonym_key() == KEY


@pytest.mark.parametrize(
    "attrs, verdict, reason",
    [
        ({"Modality": "DX", "ViewPosition": "PA", "BodyPartExamined": "CHEST"}, "read", None),
        ({"Modality": "CR", "ViewPosition": "AP"}, "read", None),  # no body part: accepted
        ({"Modality": "DX", "ViewPosition": "LL"}, "ignored", "view LL is not frontal"),  # lateral of the study
        ({"Modality": "DX", "ViewPosition": ""}, "problem", "no ViewPosition"),
        ({"Modality": "DX", "ViewPosition": "PA", "BodyPartExamined": "HAND"}, "problem", "body part HAND"),
        ({"Modality": "CT"}, "read", None),  # other modalities: the full read names the reason
    ],
)
def test_selection_verdict(attrs, verdict, reason):
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    got_verdict, got_reason = selection_verdict(ds)
    assert got_verdict == verdict
    assert (got_reason is None) if reason is None else (reason in got_reason)


def test_inference_log_round_trip(db_url):
    repo = Repository(db_url)
    repo.record_inference(InferenceRecord("s" * 64, "p" * 64, "m" * 64, "round 3", 2, ("Effusion", "Mass"), "ok"))
    repo.record_inference(InferenceRecord("t" * 64, "p" * 64, "m" * 64, "round 3", 0, (), "skipped", "no pixel data"))
    rows = repo.inference_logs()
    assert [(r["status"], r["positive_findings"], r["num_images"]) for r in rows] == [
        ("ok", "Effusion|Mass", 2),
        ("skipped", "", 0),
    ]
    assert rows[1]["message"] == "no pixel data" and repo.verify_audit() is None
    with pytest.raises(ValueError, match="inference status must be one of"):
        InferenceRecord("s", "p", "m", "v", 1, (), "maybe")
    repo.close()


# --- the whole run ----------------------------------------------------------------------------------------------


def test_infer_outputs_decisions_heatmaps_log_and_pseudonyms(tmp_path, model_path, studies):
    # First run: the model file has no thresholds, and every output says so.
    first = run_inference(studies["root"], model_path, _options(tmp_path / "r1", heatmaps=False))
    j = json.loads((tmp_path / "r1" / "studies" / studies["A"] / "result.json").read_text())
    assert j["thresholds"]["source"] == "default 0.5 (the model file has no thresholds)"
    assert _read_csv(tmp_path / "r1" / "results.csv")[0]["thresholds"].startswith("default 0.5")
    probs = {r.study_uid: r.probabilities for r in first.results}

    # Thresholds set so Effusion is positive for A only and every other finding negative for both.
    p_a, p_b = probs[studies["A"]]["Effusion"], probs[studies["B"]]["Effusion"]
    assert p_a != p_b
    thresholds = {f: 1.0 for f in CXR14_FINDINGS}
    thresholds["Effusion"] = p_a if p_a > p_b else p_b
    positive_study = studies["A"] if p_a > p_b else studies["B"]
    negative_study = studies["B"] if p_a > p_b else studies["A"]
    blob = torch.load(model_path, weights_only=True)
    with_thr = tmp_path / "model_thr.pt"
    write_model_file(
        with_thr, blob["state_dict"], {**blob["meta"], META_THRESHOLDS: thresholds, META_THRESHOLD_METHOD: "manual"}
    )

    out = tmp_path / "r2"
    summary = run_inference(studies["root"], with_thr, _options(out, secondary_capture=True, structured_report=True))
    assert summary.exit_status == 0  # the lateral view is ignored, not an error
    by_uid = {r.study_uid: r for r in summary.results}
    assert by_uid[positive_study].positive == ["Effusion"] and by_uid[negative_study].positive == []
    # probabilities do not depend on thresholds, heatmaps or the second model file
    assert by_uid[positive_study].probabilities == pytest.approx(probs[positive_study], abs=1e-6)

    pos = json.loads((out / "studies" / positive_study / "result.json").read_text())
    # one model identity, the file hash labelled as such; no card in this file, and every output says what that means
    assert pos["model"] == {
        "name": "model_thr.pt (chest_xray14, round 3)",
        "model_file_sha256": file_sha256(with_thr),
        "version": "round 3",
        "round": 3,
        "image_size": SIZE,
        "norm": "batch",
        "model_card": None,
    }
    assert pos["clinical_use_warning"].startswith("NOT FOR CLINICAL USE: this model file carries no model card")
    assert pos["thresholds"]["source"] == "model (manual)"
    assert pos["positive_findings"] == ["Effusion"] and "Effusion" not in pos["negative_findings"]
    assert len(pos["negative_findings"]) == 13
    if positive_study == studies["A"]:
        assert [f["reason"] for f in pos["ignored_files"]] == [
            "view LL is not frontal (PA/AP); only frontal views are read"
        ]
    # one overlay per positive finding, an RGB PNG with the source's aspect, and its Secondary Capture
    png = Path(pos["heatmaps"]["Effusion"])
    assert png.name == "Effusion.png" and Image.open(png).mode == "RGB"
    assert sorted(p.name for p in png.parent.iterdir()) == [
        "Effusion.dcm",
        "Effusion.png",
        "report_sr.dcm",
        "result.json",
    ]
    sc = pydicom.dcmread(pos["secondary_captures"]["Effusion"])
    source = pydicom.dcmread(pos["images"][0]["file"], stop_before_pixels=True)
    assert sc.SOPClassUID.name == "Secondary Capture Image Storage"
    assert sc.StudyInstanceUID == positive_study and sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.pixel_array.shape == (512, 512, 3) and "Effusion" in sc.DerivationDescription
    # no model card: the not-for-clinical-use banner is in the pictures themselves
    assert tuple(np.asarray(Image.open(png))[2, 2]) == (150, 0, 0) and tuple(sc.pixel_array[2, 2]) == (150, 0, 0)
    assert sc.BurnedInAnnotation == "YES"
    neg = json.loads((out / "studies" / negative_study / "result.json").read_text())
    assert neg["heatmaps"] == {} and neg["positive_findings"] == []
    # the Structured Report of each study says what result.json says, read back with highdicom
    for j in (pos, neg):
        sr = pydicom.dcmread(j["structured_report"])
        assert sr.SOPClassUID.name == "Comprehensive 3D SR Storage" and sr.StudyInstanceUID == j["study_instance_uid"]
        said = read_structured_report(sr)
        assert said["probabilities"] == pytest.approx(j["probabilities"], abs=1e-6)
        assert said["thresholds"] == pytest.approx(thresholds, abs=1e-6)
        assert [f for f, v in said["evaluations"].items() if v == "Present"] == j["positive_findings"]
        assert said["evaluations"]["Clinical use"] == "Not for clinical use"
        assert (
            pos["clinical_use_warning"] in said["texts"]
            and f"model file sha256: {file_sha256(with_thr)}" in said["texts"]
        )

    rows = {r["study_instance_uid"]: r for r in _read_csv(out / "results.csv")}
    assert rows[positive_study]["positive_findings"] == "Effusion" and rows[negative_study]["positive_findings"] == ""
    assert float(rows[positive_study]["p_Effusion"]) == pytest.approx(max(p_a, p_b), abs=1e-6)
    assert rows[positive_study]["model_file_sha256"] == file_sha256(with_thr)
    assert rows[positive_study]["clinical_use_warning"] == pos["clinical_use_warning"]
    assert "NOT FOR CLINICAL USE" in sc.DerivationDescription

    # The inference log: one row per study, pseudonyms only, reproducible with the site key.
    logs = _logs(out)
    expected = {
        pseudonymise(KEY, "study", studies[s]): pseudonymise(KEY, "patient", studies["patients"][s]) for s in ("A", "B")
    }
    assert {r["study_pseudonym"]: r["patient_pseudonym"] for r in logs} == expected
    assert {r["positive_findings"] for r in logs} == {"Effusion", ""}
    assert all(
        r["model_sha256"] == file_sha256(with_thr) and r["model_version"] == "model_thr.pt (chest_xray14, round 3)"
        for r in logs
    )
    # no patient identifier in clear anywhere (database file included) but the Secondary Capture, which must name
    # its patient to be filed in the PACS
    clear = [v.encode() for v in studies["patients"].values()] + [b"SYNTHETIC^"]
    for f in out.rglob("*"):
        if f.is_file() and f.suffix != ".dcm":
            data = f.read_bytes()
            assert not any(c in data for c in clear), f"patient identifier in clear in {f.name}"


def test_batch_size_does_not_change_probabilities(tmp_path, model_path, studies):
    one = run_inference(studies["root"], model_path, _options(tmp_path / "b1", batch_size=1, heatmaps=False))
    many = run_inference(studies["root"], model_path, _options(tmp_path / "b4", batch_size=4, heatmaps=False))
    for a, b in zip(one.results, many.results):
        assert a.study_uid == b.study_uid
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-5)


def _bare(path: Path, modality: str, study_uid: str, **attrs) -> Path:
    """A non-image object (SR, PR, RT...): header only."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.Modality, ds.PatientID = study_uid, modality, "PATBAD"
    for k, v in attrs.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _rewrite(path: Path, change) -> Path:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)
    return path


def test_bad_inputs_are_each_named_with_a_reason_and_the_rest_is_read(tmp_path, model_path):
    root = tmp_path / "mixed"
    good_uid, bad_uid = generate_uid(), generate_uid()
    good = [
        _dicom(root / "good", f"G{i}", f"PATG{i}", generate_uid() if i else good_uid, seed=10 + i) for i in range(3)
    ]
    cut_source = _dicom(root / "bad", "cut.dcm", "PATBAD", bad_uid, seed=5)
    cut_source.write_bytes(cut_source.read_bytes()[:2000])  # the file ends inside the pixel data

    def two_frames(ds):
        ds.NumberOfFrames, ds.PixelData = 2, ds.PixelData * 2

    mr_volume = _rewrite(_dicom(root / "bad", "mr_volume.dcm", "PATBAD", bad_uid, seed=6, Modality="MR"), two_frames)
    dx_cine = _rewrite(_dicom(root / "bad", "dx_cine.dcm", "PATBAD", bad_uid, seed=12), two_frames)
    bad = {
        # non-image objects
        _bare(root / "bad" / "sr.dcm", "SR", bad_uid): "modality SR is not an image",
        _bare(root / "bad" / "pr.dcm", "PR", good_uid): "modality PR is not an image",  # beside a good image
        _bare(root / "bad" / "rt.dcm", "RTSTRUCT", bad_uid): "modality RTSTRUCT is not an image",
        # a CT slice and an MR volume given to the chest model
        _dicom(
            root / "bad", "ct.dcm", "PATBAD", bad_uid, seed=4, Modality="CT"
        ): "modality CT is not one of ['CR', 'DX']",
        mr_volume: "modality MR is not one of ['CR', 'DX']",
        dx_cine: "2 frames; a single 2-D image is required",  # multi-frame, even of the right modality
        # a colour image
        _rewrite(
            _dicom(root / "bad", "rgb.dcm", "PATBAD", bad_uid, seed=7),
            lambda ds: (setattr(ds, "PhotometricInterpretation", "RGB"), setattr(ds, "SamplesPerPixel", 3)),
        ): "colour image (RGB)",
        # JPEG-LS: no decoder installed (pydicom would need pylibjpeg-libjpeg or gdcm)
        _rewrite(
            _dicom(root / "bad", "jpegls.dcm", "PATBAD", bad_uid, seed=8),
            lambda ds: (
                setattr(ds.file_meta, "TransferSyntaxUID", JPEGLSLossless),
                setattr(ds, "PixelData", pydicom.encaps.encapsulate([b"\xff\xd8" + b"\x00" * 62])),
            ),
        ): "cannot decode transfer syntax JPEG-LS Lossless",
        # pixel data shorter than rows x columns, and a file cut short mid-pixel-data
        _rewrite(
            _dicom(root / "bad", "short_pixels.dcm", "PATBAD", bad_uid, seed=9),
            lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]),
        ): "pixel data is truncated or corrupt",
        cut_source: "pixel data is truncated or corrupt",
        # an image header with no pixel data
        _rewrite(
            _dicom(root / "bad", "nopix.dcm", "PATBAD", bad_uid, seed=11), lambda ds: ds.pop("PixelData")
        ): "no pixel data",
        # not DICOM at all: said without pydicom's "Use force=True" (checked below), not a fedmed option
        (root / "bad" / "notes.txt"): "not a DICOM file: no 'DICM' marker after a 128-byte preamble",
    }
    (root / "bad" / "notes.txt").write_text("ward round notes")

    out = tmp_path / "out"
    env = {**os.environ, ENV_PSEUDONYM_KEY: KEY.decode(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(REPO / "scripts" / "infer"),
            str(root),
            "--model",
            str(model_path),
            "--out",
            str(out),
            "--no-heatmaps",
            "--threads",
            "1",
            "--record-dir",
            str(_record(out)),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "force" not in proc.stderr.lower()
    for path, reason in bad.items():
        line = next((ln for ln in proc.stderr.splitlines() if ln.startswith(f"SKIPPED {path}:")), None)
        assert line is not None, f"{path.name} not reported:\n{proc.stderr}"
        assert reason in line, line
    summary = json.loads((out / "summary.json").read_text())
    assert {Path(f["file"]) for f in summary["skipped_files"]} == set(bad)
    assert summary["exit_status"] == 1 and summary["images_read"] == len(good)
    assert summary["studies_skipped"] == [bad_uid]  # the study with only bad files
    assert f"SKIPPED study {bad_uid}: no usable frontal chest radiograph" in proc.stderr
    rows = {r["study_instance_uid"]: r for r in _read_csv(out / "results.csv")}
    assert sum(r["status"] == "ok" for r in rows.values()) == 3 and rows[bad_uid]["status"] == "skipped"
    assert "1 file(s) skipped: modality PR is not an image" in rows[good_uid]["message"]
    assert "3 studies read" not in proc.stdout and "4 studies: 3 read (3 images" in proc.stdout
    logs = _logs(out)
    skipped = [r for r in logs if r["status"] == "skipped"]
    assert len(logs) == 4 and len(skipped) == 1
    assert "no pixel data" in skipped[0]["message"] and str(root) not in skipped[0]["message"]  # reasons, no paths


def test_model_files_that_cannot_be_used_are_named(tmp_path, model_path):
    state = torch.load(model_path, weights_only=True)["state_dict"]
    body = {k: v for k, v in state.items() if not k.startswith("class_layers.out.")}
    write_model_file(tmp_path / "he.pt", body, {"round": 4, C.META_ENCRYPTED: {"layers": ["class_layers.out.weight"]}})
    with pytest.raises(ValueError, match="head is CKKS-encrypted.*final_global_model.pt"):
        read_model_file(tmp_path / "he.pt")  # an HE run's server-side model: the head is not readable there
    write_model_file(tmp_path / "body.pt", body, {})
    with pytest.raises(ValueError, match="body.pt: no class_layers.out.weight"):
        read_model_file(tmp_path / "body.pt")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        read_model_file(tmp_path / "missing.pt")


def _infer_main():
    spec = importlib.util.spec_from_file_location("infer_cli", REPO / "scripts" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_infer_exits_2_with_a_message_for_unusable_arguments(tmp_path, model_path, studies, monkeypatch, capsys):
    main = _infer_main()
    monkeypatch.setenv(ENV_PSEUDONYM_KEY, KEY.decode())
    assert main([str(studies["root"]), "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "model file not found" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--model", str(model_path), "--out", str(tmp_path / "o")]) == 2
    assert "DICOM input does not exist" in capsys.readouterr().err
    inside = ["--out", str(tmp_path / "o"), "--record-dir", str(tmp_path / "o" / "record")]
    assert main([str(studies["root"]), "--model", str(model_path)] + inside) == 2
    assert "inside the results folder" in capsys.readouterr().err and not (tmp_path / "o").exists()
    monkeypatch.delenv(ENV_PSEUDONYM_KEY)
    with pytest.raises(SystemExit) as exit_info:
        main([str(studies["root"]), "--model", str(model_path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "no pseudonym key" in capsys.readouterr().err


# --- thresholds chosen on validation data, and the bundle --------------------------------------------------------


def test_choose_thresholds_stores_them_in_the_model_file(tmp_path, model_path):
    labels = np.zeros((8, 14), int)
    labels[:4, 2] = 1  # Effusion: 4 positives, 4 negatives; every other finding has no positive
    rng = np.random.default_rng(0)
    csv_path = write_site(tmp_path / "site", labels, ["val"] * 6 + ["train"] * 2, ScannerProfile(), rng, SIZE)
    out = tmp_path / "thr.pt"
    meta = choose_thresholds(model_path, tmp_path / "site" / "dicom", csv_path, out, split="val")
    assert list(meta[META_THRESHOLDS]) == ["Effusion"] and 0.0 <= meta[META_THRESHOLDS]["Effusion"] <= 1.0
    assert meta["threshold_data"]["images"] == 6 and meta["threshold_data"]["positives"]["Effusion"] >= 1
    assert meta["round"] == 3 and meta["threshold_data"]["chosen_with_model_file_sha256"] == file_sha256(model_path)
    thresholds = read_model_file(out).thresholds()
    assert thresholds.values["Effusion"] == meta[META_THRESHOLDS]["Effusion"] and thresholds.values["Mass"] == 0.5
    assert thresholds.source.startswith("model (youden_j); default 0.5 for Atelectasis, Cardiomegaly")
    # the weights are the source model's
    assert all(
        torch.equal(a, b)
        for a, b in zip(read_model_file(out).state_dict.values(), read_model_file(model_path).state_dict.values())
    )


@pytest.mark.parametrize("split, said", [("all", "(every labelled row: --split all)"), ("val", "(split val)")])
def test_choose_thresholds_names_the_split_it_used(tmp_path, model_path, capsys, split, said):
    # `--split all` printed "(split None)"
    from fedmed.cli.choose_thresholds import main

    labels = np.zeros((8, 14), int)
    labels[:4, 2] = 1
    csv_path = write_site(
        tmp_path / "site", labels, ["val"] * 6 + ["train"] * 2, ScannerProfile(), np.random.default_rng(0), SIZE
    )
    args = ["--model", str(model_path), "--dicom", str(tmp_path / "site" / "dicom"), "--labels", str(csv_path)]
    assert main([*args, "--split", split, "--out", str(tmp_path / "thr.pt"), "--no-ood"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert (
        first == f"1 thresholds chosen on {8 if split == 'all' else 6} images {said}, written to {tmp_path / 'thr.pt'}"
    )


def _bundle_and_infer(bundle: Path, dicom_root: Path, model_path: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Per-image probabilities {file: array} from `monai.bundle run` of the exported bundle and from infer."""
    out = tmp_path / "bundle_out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(dicom_root),
            "--output_dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert rows[0] == ["file"] + [f"p_{c}" for c in meta["label_classes"].values()]  # the header says which is which
    from_bundle = {row[0]: np.array(row[1:], float) for row in rows[1:]}
    summary = run_inference(dicom_root, model_path, _options(tmp_path / "infer", heatmaps=False))
    from_infer = {im["file"]: np.array(list(im["probabilities"].values())) for r in summary.results for im in r.images}
    return from_bundle, from_infer


def test_exported_bundle_runs_with_monai_bundle_and_matches_infer(tmp_path, model_path, studies):
    from fedmed.inference.bundle import export_bundle

    bundle = export_bundle(model_path, tmp_path / "bundle")
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()) == [
        "README.md",
        "configs/inference.json",
        "configs/metadata.json",
        "models/model.pt",
    ]
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["dataset_dir"] == "" and str(tmp_path) not in json.dumps(config)  # no hard-coded paths
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["fedmed"]["model"]["model_file_sha256"] == file_sha256(model_path)
    # no card in this model file: the bundle says what that means, where a reader of the bundle looks
    assert (
        meta["fedmed"]["clinical_use_warning"].startswith("NOT FOR CLINICAL USE")
        and meta["fedmed"]["model_card"] is None
    )
    assert meta["intended_use"].startswith("NOT FOR CLINICAL USE")
    readme = (bundle / "README.md").read_text()
    assert "**NOT FOR CLINICAL USE" in readme and "## Model card" in readme and "skipped.csv" in readme
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [SIZE, SIZE]

    from_bundle, from_infer = _bundle_and_infer(bundle, studies["root"], model_path, tmp_path)
    assert set(from_bundle) == set(from_infer) and len(from_infer) == 2  # the lateral view is left out by both
    for path, probs in from_infer.items():
        np.testing.assert_allclose(from_bundle[path], probs, atol=1e-5, rtol=0)


# --- the brain MRI task: same run, configured by the model file's task --------------------------------------------


@pytest.fixture(scope="module")
def brain_model_path(tmp_path_factory):
    """A freshly initialised, seeded 4-class DenseNet-121 whose meta names its task, as the Controller writes it."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("brain_model") / "global_model.pt"
    write_model_file(
        path,
        build_densenet121(len(BRAIN_CLASSES)).state_dict(),
        {"round": 2, "image_size": SIZE, "norm": "batch", "task": "brain_mri"},
    )
    return path


def _mr_slice(folder: Path, name: str, patient: str, study_uid: str, label: int, seed: int, **overrides) -> Path:
    """One synthetic axial T1 slice, tagged as the brain hospitals' scanners tag it."""
    rng = np.random.default_rng(seed)
    pixels = acquire(render_brain(label, rng, SIZE), BRAIN_TEST_SCANNER, rng)
    ds = make_dicom(
        pixels,
        BRAIN_TEST_SCANNER,
        patient,
        study_uid,
        generate_uid(),
        generate_uid(),
        BRAIN_MRI_FAMILY.tags(rng),
        "hospital-x",
    )
    for k, v in overrides.items():
        setattr(ds, k, v)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


@pytest.fixture(scope="module")
def brain_studies(tmp_path_factory):
    """Study A: two axial slices, a sagittal one and a chest CR film filed in the same folder; study B: one slice."""
    root = tmp_path_factory.mktemp("brain_studies")
    a_uid, b_uid = generate_uid(), generate_uid()
    _mr_slice(root / "a", "IM1", "PATMA", a_uid, BRAIN_CLASSES.index("glioma"), seed=1)
    _mr_slice(root / "a", "IM2", "PATMA", a_uid, BRAIN_CLASSES.index("glioma"), seed=2)
    sagittal = _mr_slice(root / "a", "IM3", "PATMA", a_uid, 0, seed=3, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    chest = _dicom(root / "a", "IM4", "PATMA", a_uid, "PA", seed=4, scanner=ScannerProfile("CR", "MONOCHROME1"))
    _mr_slice(root / "b", "IM1", "PATMB", b_uid, BRAIN_CLASSES.index("meningioma"), seed=5)
    return {"root": root, "A": a_uid, "B": b_uid, "sagittal": sagittal, "chest": chest}


@pytest.mark.parametrize(
    "attrs, verdict, reason",
    [
        ({"Modality": "MR", "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "BodyPartExamined": "BRAIN"}, "read", None),
        # oblique axial (20 degrees about x, along the AC-PC line), no body part: still axial
        ({"Modality": "MR", "ImageOrientationPatient": [1, 0, 0, 0, 0.94, -0.34]}, "read", None),
        ({"Modality": "MR", "ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "ignored", "sagittal slice is not axial"),
        ({"Modality": "MR", "ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, "ignored", "coronal slice is not axial"),
        ({"Modality": "MR"}, "problem", "no usable ImageOrientationPatient"),
        (
            {"Modality": "MR", "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "BodyPartExamined": "KNEE"},
            "problem",
            "body part KNEE is not BRAIN/HEAD",
        ),
        ({"Modality": "CR", "ViewPosition": "PA"}, "read", None),  # the full read names the modality
    ],
)
def test_brain_selection_verdict(attrs, verdict, reason):
    header = Dataset()
    header.update(attrs)
    got_verdict, got_reason = brain_selection_verdict(header)
    assert (got_verdict, got_reason is None) == (verdict, reason is None)
    assert reason is None or reason in got_reason


def test_infer_brain_model_argmax_class_outputs(tmp_path, brain_model_path, brain_studies, monkeypatch, capsys):
    out = tmp_path / "brain"
    monkeypatch.setenv(ENV_PSEUDONYM_KEY, KEY.decode())
    status = _infer_main()(
        [
            str(brain_studies["root"]),
            "--model",
            str(brain_model_path),
            "--out",
            str(out),
            "--secondary-capture",
            "--structured-report",
            "--threads",
            "1",
            "--record-dir",
            str(_record(out)),
        ]
    )
    printed = capsys.readouterr()
    assert status == 1  # the chest film was skipped
    assert f"SKIPPED {brain_studies['chest']}: modality CR is not one of ['MR']" in printed.err
    assert (
        "task brain_mri, decision: multiclass: argmax" in printed.out and "2 studies: 2 read (3 images" in printed.out
    )
    # where the results are, each path as written (studies/*/result.json was printed without the --out folder)
    assert f"results: {out / 'results.csv'}, {out / 'summary.json'}, {out / 'studies' / '*' / 'result.json'}; " in (
        printed.out
    )

    studies = {}
    for key in ("A", "B"):
        j = json.loads((out / "studies" / brain_studies[key] / "result.json").read_text())
        studies[key] = j
        assert j["task"] == "brain_mri" and j["decision_rule"] == "multiclass: argmax"
        assert "thresholds" not in j and "positive_findings" not in j
        assert list(j["probabilities"]) == list(BRAIN_CLASSES)
        probs = np.array(list(j["probabilities"].values()))
        assert probs.sum() == pytest.approx(1.0, abs=1e-5) and np.all(probs > 0)
        assert j["predicted_class"] == BRAIN_CLASSES[int(np.argmax(probs))]
        slices = np.array([list(im["probabilities"].values()) for im in j["images"]])
        np.testing.assert_allclose(slices.sum(axis=1), 1.0, atol=1e-5)  # softmax per slice
        np.testing.assert_allclose(slices.mean(axis=0), probs, atol=1e-6)  # the study's: the mean over its slices
        assert [im["predicted_class"] for im in j["images"]] == [BRAIN_CLASSES[int(k)] for k in slices.argmax(axis=1)]
        assert {im["view"] for im in j["images"]} == {"axial"}
        # one overlay, for the predicted class, and its Secondary Capture saying the decision rule
        predicted = j["predicted_class"]
        assert list(j["heatmaps"]) == [predicted] and Path(j["heatmaps"][predicted]).name == f"{predicted}.png"
        assert Image.open(j["heatmaps"][predicted]).mode == "RGB"
        sc = pydicom.dcmread(j["secondary_captures"][predicted])
        assert sc.StudyInstanceUID == brain_studies[key] and f"{predicted} p=" in sc.DerivationDescription
        assert "(multiclass: argmax)" in sc.DerivationDescription
    assert len(studies["A"]["images"]) == 2 and len(studies["B"]["images"]) == 1
    assert studies["A"]["ignored_files"] == [
        {"file": str(brain_studies["sagittal"]), "reason": "sagittal slice is not axial; only axial slices are read"}
    ]
    assert studies["A"]["skipped_files"] == [
        {"file": str(brain_studies["chest"]), "reason": "modality CR is not one of ['MR']"}
    ]

    rows = {r["study_instance_uid"]: r for r in _read_csv(out / "results.csv")}
    header = list(rows[brain_studies["A"]])
    assert header[6] == "predicted_class" and header[8:12] == [f"p_{c}" for c in BRAIN_CLASSES]
    assert "positive_findings" not in header and "thresholds" not in header
    for key in ("A", "B"):
        row, j = rows[brain_studies[key]], studies[key]
        assert row["predicted_class"] == j["predicted_class"] and row["decision_rule"] == "multiclass: argmax"
        said = read_structured_report(pydicom.dcmread(j["structured_report"]))  # the SR: the argmax class Present
        assert said["thresholds"] == {} and said["probabilities"] == pytest.approx(j["probabilities"], abs=1e-6)
        assert [c for c in BRAIN_CLASSES if said["evaluations"][c] == "Present"] == [j["predicted_class"]]
        assert [float(row[f"p_{c}"]) for c in BRAIN_CLASSES] == pytest.approx(
            list(j["probabilities"].values()), abs=1e-6
        )
    assert "1 file(s) skipped: modality CR is not one of ['MR']" in rows[brain_studies["A"]]["message"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "brain_mri" and summary["decision_rule"] == "multiclass: argmax"
    assert summary["images_read"] == 3 and [f["file"] for f in summary["skipped_files"]] == [
        str(brain_studies["chest"])
    ]

    # the inference log: the predicted class where the chest model logs its positive findings
    logs = _logs(out)
    assert sorted(r["positive_findings"] for r in logs) == sorted(studies[k]["predicted_class"] for k in ("A", "B"))


def test_task_option_overrides_the_model_file_and_must_fit_its_head(
    tmp_path, model_path, brain_model_path, brain_studies, studies
):
    # a model file with no task in its meta, told by --task what it is
    blob = torch.load(brain_model_path, weights_only=True)
    untagged = tmp_path / "untagged.pt"
    write_model_file(untagged, blob["state_dict"], {"round": 2, "image_size": SIZE})
    summary = run_inference(
        brain_studies["root"], untagged, _options(tmp_path / "o1", heatmaps=False, task="brain_mri")
    )
    assert summary.thresholds_source == "multiclass: argmax"
    assert summary.results[0].predicted in BRAIN_CLASSES and summary.results[0].positive == []
    # the chest model on brain slices: every MR slice is skipped naming its modality
    chest_on_mr = run_inference(brain_studies["root"] / "b", model_path, _options(tmp_path / "o2", heatmaps=False))
    assert chest_on_mr.results[0].status == "skipped"
    assert [p.reason for p in chest_on_mr.results[0].problems] == ["modality MR is not one of ['CR', 'DX']"]
    # a 14-output chest model is not a brain model
    with pytest.raises(ValueError, match=r"model has 14 outputs but task brain_mri has 4 classes"):
        run_inference(studies["root"], model_path, _options(tmp_path / "o3", task="brain_mri"))
    with pytest.raises(ValueError, match="decision thresholds are for multi-label models only"):
        choose_thresholds(brain_model_path, brain_studies["root"], tmp_path / "labels.csv", tmp_path / "thr.pt")


def test_brain_bundle_runs_with_monai_bundle_and_matches_infer(tmp_path, brain_model_path, brain_studies):
    spec = importlib.util.spec_from_file_location("export_cli", REPO / "scripts" / "export_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bundle = tmp_path / "brain_bundle"
    assert module.main(["--model", str(brain_model_path), "--out", str(bundle)]) == 0  # task from the model file
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["postprocessing"]["transforms"][0] == {"_target_": "Activationsd", "keys": "pred", "softmax": True}
    assert config["datalist"]["task"] == "brain_mri" and config["dataset_dir"] == ""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "MR"
    assert meta["label_classes"] == {str(i): c for i, c in enumerate(BRAIN_CLASSES)}
    assert meta["fedmed"]["decision_rule"] == "multiclass: argmax" and "thresholds" not in meta["fedmed"]
    assert "multiclass: argmax" in (bundle / "README.md").read_text()

    from_bundle, from_infer = _bundle_and_infer(bundle, brain_studies["root"], brain_model_path, tmp_path)
    assert set(from_bundle) == set(from_infer) and len(from_infer) == 3  # sagittal slice and chest film left out
    for path, probs in from_infer.items():
        np.testing.assert_allclose(from_bundle[path], probs, atol=1e-5, rtol=0)


# --- model card, not-for-clinical-use, Grad-CAM resolution, the bundle's skipped files -----------------------------


def _card_meta(synthetic: bool) -> dict:
    from types import SimpleNamespace

    from fedmed.models.model_card import ModelCardBuilder

    builder = ModelCardBuilder("chest_xray14", "geometric_median", "NVFlare federation (fedmed)")
    builder.add_round(
        ["hospital-a", "hospital-b"],
        [
            SimpleNamespace(site="hospital-a", data_synthetic=synthetic, privacy={"epsilon": 2.5}),
            SimpleNamespace(site="hospital-b", data_synthetic=synthetic, privacy={}),
        ],
    )
    return builder.card().to_meta()


def test_synthetic_model_says_so_in_every_output_and_refuses_a_1x1_gradcam(
    tmp_path, model_path, studies, monkeypatch, capsys
):
    blob = torch.load(model_path, weights_only=True)
    path = tmp_path / "synthetic.pt"
    # image size 32: DenseNet-121's last feature map is 1x1; thresholds 0: every finding positive, so a heatmap
    # would be drawn for each if Grad-CAM were not refused
    write_model_file(
        path,
        blob["state_dict"],
        {
            **blob["meta"],
            "image_size": 32,
            "model_card": _card_meta(True),
            META_THRESHOLDS: {f: 0.0 for f in CXR14_FINDINGS},
        },
    )
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_PSEUDONYM_KEY, KEY.decode())
    status = _infer_main()(
        [str(studies["root"]), "--model", str(path), "--out", str(out), "--secondary-capture", "--threads", "1"]
    )
    printed = capsys.readouterr().out
    assert status == 0
    line = "NOT FOR CLINICAL USE: trained on synthetic data (hospital-a, hospital-b)"
    assert printed.count(line) == 2  # first and last line of the console output
    assert "hospital-a epsilon 2.50, hospital-b no DP" in printed and "Grad-CAM not drawn: at 32 px" in printed
    assert "out-of-distribution: not checked (the model file has no OOD statistics" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clinical_use_warning"].startswith(line) and summary["heatmap_note"].startswith("Grad-CAM not drawn")
    assert summary["model"]["model_card"]["synthetic_sites"] == ["hospital-a", "hospital-b"]
    for uid in (studies["A"], studies["B"]):
        j = json.loads((out / "studies" / uid / "result.json").read_text())
        assert j["clinical_use_warning"].startswith(line) and j["model"]["model_card"]["rounds"] == 1
        assert j["positive_findings"] == list(CXR14_FINDINGS) and j["heatmaps"] == {} and j["secondary_captures"] == {}
        assert j["heatmap_note"] == summary["heatmap_note"]
    assert all(r["clinical_use_warning"].startswith(line) for r in _read_csv(out / "results.csv"))


def test_real_data_card_has_no_warning_and_a_coarse_gradcam_is_flagged(tmp_path, model_path, studies):
    blob = torch.load(model_path, weights_only=True)
    path = tmp_path / "real.pt"
    write_model_file(
        path,
        blob["state_dict"],
        {**blob["meta"], "model_card": _card_meta(False), META_THRESHOLDS: {f: 0.0 for f in CXR14_FINDINGS}},
    )
    summary = run_inference(studies["root"], path, _options(tmp_path / "out"))
    assert summary.clinical_use_warning is None
    assert summary.heatmap_note.startswith(f"Grad-CAM is coarse: the model's last feature map is 2x2 at {SIZE} px")
    j = json.loads((tmp_path / "out" / "studies" / studies["A"] / "result.json").read_text())
    assert j["clinical_use_warning"] is None and len(j["heatmaps"]) == 14  # drawn, with the note beside them
    assert tuple(np.asarray(Image.open(j["heatmaps"]["Effusion"]))[2, 2]) != (150, 0, 0)  # no banner
    assert _read_csv(tmp_path / "out" / "results.csv")[0]["clinical_use_warning"] == ""


def test_a_malformed_model_card_is_refused_before_anything_is_written(tmp_path, model_path, studies):
    blob = torch.load(model_path, weights_only=True)
    path = tmp_path / "bad.pt"
    write_model_file(path, blob["state_dict"], {**blob["meta"], "model_card": {"rounds": "many"}})
    with pytest.raises(ValueError, match="bad.pt: model_card rounds must be an integer"):
        run_inference(studies["root"], path, _options(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bundle_lists_skipped_and_ignored_files_with_reasons(tmp_path, model_path, studies):
    from fedmed.inference.studies import task_image_datalist

    root = tmp_path / "dicom"
    _dicom(root / "s", "IM1", "P1", generate_uid(), "PA", seed=1)
    _dicom(root / "s", "IM2", "P1", generate_uid(), "LL", seed=2)
    (root / "s" / "notes.txt").write_text("not DICOM")
    skipped = tmp_path / "eval" / "skipped.csv"
    items = task_image_datalist(str(root), "chest_xray14", str(skipped))
    rows = _read_csv(skipped)
    assert [Path(i["image"]).name for i in items] == ["IM1"]
    assert {(Path(r["file"]).name, r["status"]) for r in rows} == {("IM2", "ignored"), ("notes.txt", "skipped")}
    assert all(r["reason"] for r in rows)


def test_ood_guard_calibrated_with_the_thresholds_flags_an_image_unlike_them(tmp_path, model_path, studies):
    labels = np.zeros((12, 14), int)
    labels[:6, 2] = 1
    rng = np.random.default_rng(0)
    csv_path = write_site(tmp_path / "site", labels, ["val"] * 12, ScannerProfile(), rng, SIZE)
    calibrated = tmp_path / "calibrated.pt"
    meta = choose_thresholds(model_path, tmp_path / "site" / "dicom", csv_path, calibrated, split="val")
    assert meta["ood"]["calibration"]["images"] == 12 and meta["ood"]["threshold"] > 0
    # an image no chest scanner makes: uniform noise in a valid DX header
    noise_uid = generate_uid()
    pixels = np.random.default_rng(5).integers(0, 4095, (SIZE, SIZE)).astype(np.uint16)
    ds = make_dicom(
        pixels,
        ScannerProfile(),
        "PATN",
        noise_uid,
        generate_uid(),
        generate_uid(),
        {"BodyPartExamined": "CHEST", "ViewPosition": "PA"},
        "hospital-x",
    )
    root = tmp_path / "in"
    (root / "noise").mkdir(parents=True)
    ds.save_as(root / "noise" / "IM1", enforce_file_format=True)
    shutil.copytree(studies["root"], root / "chest")
    out = tmp_path / "out"
    summary = run_inference(root, calibrated, _options(out, heatmaps=False, structured_report=True))
    noise = json.loads((out / "studies" / noise_uid / "result.json").read_text())
    chest = json.loads((out / "studies" / studies["A"] / "result.json").read_text())
    assert noise["out_of_distribution"]["flagged_images"] == [ds.SOPInstanceUID]
    assert noise["images"][0]["out_of_distribution"] is True
    assert noise["images"][0]["ood_score"] > noise["out_of_distribution"]["threshold"] > 0
    assert chest["images"][0]["ood_score"] < noise["images"][0]["ood_score"]
    assert summary.out_of_distribution[noise_uid] == [ds.SOPInstanceUID]
    s = json.loads((out / "summary.json").read_text())
    assert s["out_of_distribution"]["checked"] and noise_uid in s["out_of_distribution"]["studies"]
    row = {r["study_instance_uid"]: r for r in _read_csv(out / "results.csv")}[noise_uid]
    assert row["ood_flagged_images"] == "1" and float(row["max_ood_score"]) == pytest.approx(
        noise["images"][0]["ood_score"], abs=1e-3
    )
    said = read_structured_report(pydicom.dcmread(noise["structured_report"]))
    assert said["evaluations"]["Unlike the training images"] == "Present"
    assert any(
        t.startswith("out-of-distribution score: feature distance to 12 calibration images") for t in said["texts"]
    )


def test_without_ood_statistics_outputs_say_not_checked(tmp_path, model_path, studies):
    run_inference(studies["root"], model_path, _options(tmp_path / "out", heatmaps=False))
    j = json.loads((tmp_path / "out" / "studies" / studies["A"] / "result.json").read_text())
    assert j["out_of_distribution"]["checked"] is False and j["images"][0]["ood_score"] is None
    assert j["out_of_distribution"]["note"].startswith("out-of-distribution: not checked")
    assert _read_csv(tmp_path / "out" / "results.csv")[0]["ood_flagged_images"] == ""


# --- issue 31: heatmaps never silently empty, thresholds and identifiers, OOD marks, the record outside --out ------


def _set_head_row(weight: torch.Tensor, k: int, how: str) -> None:
    """Make finding k's evidence positive, negative or absent in every cell: the activations Grad-CAM reads
    (class_layers.relu) are >= 0, so the sign of the head's row decides the sign of every cell's evidence."""
    with torch.no_grad():
        weight[k] = {"positive": weight[k].abs(), "negative": -weight[k].abs(), "zero": torch.zeros_like(weight[k])}[
            how
        ]


@pytest.mark.parametrize(
    "how, method",
    [
        ("positive", "grad-cam"),  # evidence above zero somewhere: Grad-CAM's positive part, hot where it is highest
        ("negative", "relative"),  # evidence below zero everywhere (the 2-round demo's model): was an all-zero map
        ("zero", "flat"),  # no evidence anywhere: no heat, and said so
    ],
)
def test_heatmap_is_never_silently_empty_nor_inverted(how, method):
    from monai.visualize import GradCAM

    from fedmed.data.synthetic import ScannerProfile as Scanner
    from fedmed.inference.predict import GRADCAM_LAYER, HeatmapMaker, Preprocessor

    torch.manual_seed(0)
    model = build_densenet121(14).eval()
    k = CXR14_FINDINGS.index("Effusion")
    _set_head_row(model.class_layers.out.weight, k, how)
    rng = np.random.default_rng(1)
    image = Preprocessor(128)(acquire(render_chest([0] * 14, rng, 128), Scanner(), rng).astype(np.float32))
    maker = HeatmapMaker(model, CXR14_FINDINGS)
    cells = maker.evidence(image, "Effusion")
    heat = maker(image, "Effusion")
    assert cells.shape == (4, 4) and heat.method == method and heat.heat.shape == (128, 128)
    if method == "flat":
        assert not heat.heat.any() and heat.note.startswith("heatmap flat") and heat.banner.startswith("HEATMAP FLAT")
        return
    assert heat.heat.min() >= 0 and heat.heat.max() == pytest.approx(1.0, abs=0.02)
    # the hottest pixel lies in the cell of highest evidence (monai's default normaliser put the coldest there)
    row, col = np.unravel_index(heat.heat.argmax(), heat.heat.shape)
    assert (row // 32, col // 32) == np.unravel_index(cells.argmax(), cells.shape)
    if method == "grad-cam":
        assert heat.note is None and heat.banner is None
    else:
        assert cells.max() <= 0 and "negative in every region" in heat.note
        assert heat.banner.startswith("HEATMAP RELATIVE")
        # the cause, reproduced: MONAI's Grad-CAM of this finding is zero everywhere
        assert not GradCAM(nn_module=model, target_layers=GRADCAM_LAYER)(image[None], class_idx=k).any()


def test_console_and_csv_give_thresholds_identifiers_and_each_heatmaps_status(
    tmp_path, model_path, studies, monkeypatch, capsys
):
    from fedmed.inference.predict import BOTTOM_BANNER_COLOUR

    blob = torch.load(model_path, weights_only=True)
    state = dict(blob["state_dict"])
    state["class_layers.out.weight"] = state["class_layers.out.weight"].clone()
    _set_head_row(state["class_layers.out.weight"], CXR14_FINDINGS.index("Effusion"), "negative")
    _set_head_row(state["class_layers.out.weight"], CXR14_FINDINGS.index("Mass"), "zero")
    thresholds = {f: 1.0 for f in CXR14_FINDINGS} | {"Effusion": 0.0, "Mass": 0.0}  # both positive, all else not
    path = tmp_path / "weak.pt"
    write_model_file(path, state, {**blob["meta"], META_THRESHOLDS: thresholds, META_THRESHOLD_METHOD: "manual"})
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_PSEUDONYM_KEY, KEY.decode())
    args = [str(studies["root"]), "--model", str(path), "--out", str(out), "--secondary-capture", "--threads", "1"]
    assert _infer_main()(args + ["--record-dir", str(_record(out))]) == 0
    printed = capsys.readouterr().out

    with open(out / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:6] == [
        "study_instance_uid",
        "accession_number",
        "study_date",
        "study_pseudonym",
        "status",
        "num_images",
    ]
    assert header[8:12] == ["p_Atelectasis", "t_Atelectasis", "p_Cardiomegaly", "t_Cardiomegaly"]  # each beside its own
    rows = {r["study_instance_uid"]: r for r in _read_csv(out / "results.csv")}
    a, b = rows[studies["A"]], rows[studies["B"]]
    assert (a["accession_number"], a["study_date"], b["accession_number"]) == ("ACC-A1", "2026-01-01", "")
    assert a["positive_findings"] == "Effusion|Mass" and a["unreliable_findings"] == ""
    assert (a["t_Effusion"], a["t_Emphysema"]) == ("0.000000", "1.000000")
    assert a["heatmaps"] == "Effusion: relative; Mass: flat"

    j = json.loads((out / "studies" / studies["A"] / "result.json").read_text())
    assert (j["accession_number"], j["study_date"]) == ("ACC-A1", "2026-01-01")
    assert j["heatmap_methods"] == {"Effusion": "relative", "Mass": "flat"}
    assert j["heatmap_notes"]["Effusion"].startswith("heatmap relative") and "flat" in j["heatmap_notes"]["Mass"]
    # each map's status is in the picture (bottom bar) and in the Secondary Capture's text; the two differ
    effusion, mass = (np.asarray(Image.open(j["heatmaps"][f])) for f in ("Effusion", "Mass"))
    assert tuple(effusion[-2, 2]) == BOTTOM_BANNER_COLOUR and tuple(mass[-2, 2]) == BOTTOM_BANNER_COLOUR
    assert not np.array_equal(effusion, mass)
    sc = pydicom.dcmread(j["secondary_captures"]["Effusion"])
    assert "heatmap relative (heatmap relative: Grad-CAM for Effusion is negative" in sc.DerivationDescription

    # one block per study: identifiers, each positive with its threshold, how each heatmap was made
    assert f"study {studies['A']}: accession ACC-A1, date 2026-01-01, 1 image(s)" in printed
    assert f"study {studies['B']}: accession (none), date 2026-01-01, 1 image(s)" in printed
    p_eff = float(a["p_Effusion"])
    assert f"  positive: Effusion p={p_eff:.3f} (threshold 0.000), Mass p=" in printed
    assert "  heatmaps: Effusion relative, Mass flat" in printed
    assert "heatmaps: 2 flat, 2 relative" in printed  # the run's count, two studies
    assert json.loads((out / "summary.json").read_text())["heatmap_methods"] == {"flat": 2, "relative": 2}


def test_out_of_distribution_positives_are_withheld_and_every_output_marks_them(tmp_path, model_path, studies):
    from fedmed.inference.predict import BOTTOM_BANNER_COLOUR

    labels = np.zeros((12, 14), int)
    labels[:6, 2] = 1
    rng = np.random.default_rng(0)
    csv_path = write_site(tmp_path / "site", labels, ["val"] * 12, ScannerProfile(), rng, SIZE)
    calibrated = tmp_path / "calibrated.pt"
    choose_thresholds(model_path, tmp_path / "site" / "dicom", csv_path, calibrated, split="val")
    blob = torch.load(calibrated, weights_only=True)
    thresholds = {f: 1.0 for f in CXR14_FINDINGS} | {"Effusion": 0.0, "Mass": 0.0}  # both above for every image
    marked = tmp_path / "marked.pt"
    write_model_file(marked, blob["state_dict"], {**blob["meta"], META_THRESHOLDS: thresholds})
    noise_uid = generate_uid()
    pixels = np.random.default_rng(5).integers(0, 4095, (SIZE, SIZE)).astype(np.uint16)
    tags = {"BodyPartExamined": "CHEST", "ViewPosition": "PA"}
    ds = make_dicom(pixels, ScannerProfile(), "PATN", noise_uid, generate_uid(), generate_uid(), tags, "x")
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "noise.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    summary = run_inference(tmp_path / "in", marked, _options(out, secondary_capture=True, structured_report=True))
    result = summary.results[0]
    assert result.out_of_distribution == [ds.SOPInstanceUID]
    assert result.positive == [] and result.unreliable == ["Effusion", "Mass"]  # withheld, still listed

    row = _read_csv(out / "results.csv")[0]
    assert row["positive_findings"] == "" and row["unreliable_findings"] == "Effusion|Mass"
    assert row["ood_flagged_images"] == "1" and "out of distribution: positive finding(s) withheld" in row["message"]
    j = json.loads((out / "studies" / noise_uid / "result.json").read_text())
    assert j["unreliable_findings"] == ["Effusion", "Mass"] and "Effusion" not in j["negative_findings"]
    for finding in ("Effusion", "Mass"):  # overlays drawn, each marked in the picture and in the SC's text
        assert tuple(np.asarray(Image.open(j["heatmaps"][finding]))[-2, 2]) == BOTTOM_BANNER_COLOUR
        sc = pydicom.dcmread(j["secondary_captures"][finding])
        assert "OUT OF DISTRIBUTION" in sc.SeriesDescription and sc.ImageComments.startswith("OUT OF DISTRIBUTION")
        assert sc.DerivationDescription.startswith("NOT FOR CLINICAL USE") and "OUT OF DISTRIBUTION" in (
            sc.DerivationDescription
        )
        assert sc.BurnedInAnnotation == "YES"
    said = read_structured_report(pydicom.dcmread(j["structured_report"]))
    assert said["evaluations"]["Effusion"] == said["evaluations"]["Mass"] == "Indeterminate"
    assert said["evaluations"]["Unlike the training images"] == "Present"
    log = _logs(out)[0]
    assert log["positive_findings"] == "" and "withheld" in log["message"]


def test_the_inference_record_and_its_key_stay_out_of_the_results_folder(tmp_path, model_path, studies, monkeypatch):
    out = tmp_path / "results"
    summary = run_inference(studies["root"], model_path, _options(out, heatmaps=False))
    assert not {p.name for p in out.rglob("*")} & {"fedmed.db", "audit_key", "audit_heads.log", "local"}
    record = _record(out)
    assert summary.record_dir == record and summary.db_url == f"sqlite:///{(record / 'fedmed.db').resolve()}"
    assert (record / "local" / "audit_key").stat().st_mode & 0o777 == 0o600 and (record / "audit_heads.log").is_file()
    assert len(_logs(out)) == 2 and Repository(summary.db_url).verify_audit() is None
    # a record folder inside the results, or a database there, is refused before anything is written
    with pytest.raises(ValueError, match=r"record's database would be written inside the results folder"):
        run_inference(studies["root"], model_path, _options(tmp_path / "r2", record_dir=tmp_path / "r2" / "rec"))
    monkeypatch.setenv("FEDMED_DB_URL", f"sqlite:///{tmp_path / 'r3' / 'log.db'}")
    with pytest.raises(ValueError, match=r"record's database would be written inside the results folder"):
        run_inference(studies["root"], model_path, _options(tmp_path / "r3"))
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_default_record_dir_is_the_sites_own_place(tmp_path):
    from fedmed.inference.record import ENV_RECORD_DIR, default_record_dir

    kit = tmp_path / "hospital-a"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "fed_client.json").write_text("{}")
    assert default_record_dir(kit, {}) == kit / "local" / "inference"  # run from a site startup kit
    assert default_record_dir(kit, {ENV_RECORD_DIR: str(tmp_path / "site")}) == tmp_path / "site"  # env wins
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    assert default_record_dir(tmp_path, state) == tmp_path / "state" / "fedmed" / "inference"  # not a kit
    assert default_record_dir(tmp_path, {}) == Path.home() / ".local" / "state" / "fedmed" / "inference"


def test_dicom_without_preamble_or_file_meta_is_read_and_a_non_dicom_file_is_named(tmp_path, model_path):
    root = tmp_path / "in" / "s"
    full = _dicom(root, "full.dcm", "PATP", generate_uid(), seed=1)
    (root / "no_preamble.dcm").write_bytes(full.read_bytes()[128:])  # 'DICM' and file meta, no 128-byte preamble
    bare = pydicom.dcmread(full)
    del bare.file_meta  # a bare dataset: no preamble, no 'DICM', no file meta (older modalities, some exports)
    bare.preamble, bare.SOPInstanceUID = None, generate_uid()
    pydicom.dcmwrite(root / "bare.dcm", bare, implicit_vr=True, little_endian=True)
    (root / "notes.txt").write_text("ward round notes")
    (root / "empty.dcm").write_bytes(b"")
    summary = run_inference(tmp_path / "in", model_path, _options(tmp_path / "out", heatmaps=False))
    images = summary.results[0].images
    assert [Path(im["file"]).name for im in images] == ["bare.dcm", "full.dcm", "no_preamble.dcm"]
    for im in images:  # the same pixels, the same probabilities
        assert im["probabilities"] == pytest.approx(images[1]["probabilities"], abs=1e-6)
    reasons = {p.path.name: p.reason for p in summary.skipped_files}
    assert reasons == {
        "empty.dcm": "not a DICOM file: the file is empty",
        "notes.txt": "not a DICOM file: no 'DICM' marker after a 128-byte preamble, and no DICOM dataset with a "
        "SOPClassUID and StudyInstanceUID at its start",
    }


def test_brain_model_keeps_its_predicted_class_but_marks_it_unreliable_out_of_distribution(
    tmp_path, brain_model_path, brain_studies
):
    from dataclasses import replace

    from fedmed.inference.ood import META_OOD, fit_ood
    from fedmed.inference.predict import BOTTOM_BANNER_COLOUR

    blob = torch.load(brain_model_path, weights_only=True)
    features = np.random.default_rng(0).normal(size=(8, 1024))
    every_slice = replace(fit_ood(features, "test features"), threshold=-1.0)  # a guard that flags every slice
    path = tmp_path / "guarded.pt"
    write_model_file(path, blob["state_dict"], {**blob["meta"], META_OOD: every_slice.to_meta()})
    out = tmp_path / "out"
    summary = run_inference(brain_studies["root"] / "b", path, _options(out, structured_report=True))
    result = summary.results[0]
    # argmax always names a class: it stays, listed as unreliable (nothing to withhold it in favour of)
    assert result.predicted in BRAIN_CLASSES and result.unreliable == [result.predicted]
    row = _read_csv(out / "results.csv")[0]
    assert row["predicted_class"] == result.predicted and row["unreliable_findings"] == result.predicted
    j = json.loads((out / "studies" / brain_studies["B"] / "result.json").read_text())
    said = read_structured_report(pydicom.dcmread(j["structured_report"]))
    assert said["evaluations"][result.predicted] == "Indeterminate"
    assert tuple(np.asarray(Image.open(j["heatmaps"][result.predicted]))[-2, 2]) == BOTTOM_BANNER_COLOUR


def test_a_briefly_trained_densenet_gets_no_empty_heatmap_where_monai_gradcam_was_zero():
    """The 2-round demo's flat overlays, reproduced: a few steps on images with no positive finding push every
    logit down through the features while the head's bias barely moves, so each finding's Grad-CAM evidence is
    negative in every cell and MONAI's GradCAM (ReLU, then min-max) returns zeros."""
    from monai.visualize import GradCAM

    from fedmed.data.synthetic import ScannerProfile as Scanner
    from fedmed.inference.predict import GRADCAM_LAYER, HeatmapMaker, Preprocessor

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prep = Preprocessor(SIZE)
    images = torch.stack(
        [prep(acquire(render_chest([0] * 14, rng, SIZE), Scanner(), rng).astype(np.float32)) for _ in range(16)]
    )
    model = build_densenet121(14)
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3):
        batch = images[torch.randperm(16)[:8]]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), torch.zeros(8, 14))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    monai_cam, maker = GradCAM(nn_module=model, target_layers=GRADCAM_LAYER), HeatmapMaker(model, CXR14_FINDINGS)
    empty = 0
    for k, finding in enumerate(CXR14_FINDINGS):
        was_empty = not monai_cam(images[0][None], class_idx=k).any()
        heat = maker(images[0], finding)
        empty += was_empty
        # where MONAI's map had heat ours is Grad-CAM; where it was empty, ours says what it shows instead
        assert heat.method == ("relative" if was_empty else "grad-cam") and heat.heat.max() == pytest.approx(1.0)
        assert (heat.note is not None) == was_empty
    assert empty >= 12  # 14 of 14 on the reference machine; the closest finding's evidence peaks at -0.001 logit
