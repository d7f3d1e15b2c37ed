import json

import numpy as np
import pytest
from PIL import Image

from fedmed.data.labels import load_chestxray14, load_csv_manifest, load_dicom_site, read_site_label_csv
from fedmed.data.loading import split_items
from fedmed.job.constants import CXR14_FINDINGS
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.site.site_config import load_site_config


def test_dicom_site_joins_images_to_labels_by_sop_uid(tiny_hospitals):
    site = tiny_hospitals / "hospital-a"
    table = read_site_label_csv(site / "labels.csv", CHEST_XRAY14)
    train = load_dicom_site(site / "dicom", site / "labels.csv", split="train", task=CHEST_XRAY14)
    val = load_dicom_site(site / "dicom", site / "labels.csv", split="val", task=CHEST_XRAY14)
    assert len(train) + len(val) == len(table) == 16
    assert {it.split for it in train} == {"train"} and {it.split for it in val} == {"val"}


def test_unlabelled_and_unreadable_files_are_skipped_with_a_warning(tiny_hospitals, tmp_path, caplog):
    import shutil

    dicom = tmp_path / "dicom"
    shutil.copytree(tiny_hospitals / "hospital-a" / "dicom", dicom)
    (dicom / "README.txt").write_text("not dicom")
    items = load_dicom_site(dicom, tiny_hospitals / "hospital-a" / "labels.csv", task=CHEST_XRAY14)
    assert len(items) == 16
    assert "not readable DICOM" in caplog.text


def test_wrong_label_file_says_nothing_matches(tiny_hospitals):
    with pytest.raises(ValueError, match="no labelled images"):
        load_dicom_site(
            tiny_hospitals / "hospital-a" / "dicom", tiny_hospitals / "hospital-b" / "labels.csv", task=CHEST_XRAY14
        )


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty label CSV"),  # no header at all
        ("SOPInstanceUID,split\n1.2,train\n", "missing column 'Atelectasis'"),
        ("Foo\n1\n", "needs a SOPInstanceUID or StudyInstanceUID column"),
    ],
)
def test_bad_label_csv_names_the_problem(tmp_path, content, match):
    p = tmp_path / "labels.csv"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_site_label_csv(p, CHEST_XRAY14)


def test_label_values_must_be_binary(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("SOPInstanceUID," + ",".join(CXR14_FINDINGS) + "\n1.2," + ",".join(["0"] * 13 + ["yes"]) + "\n")
    with pytest.raises(ValueError, match="line 2: column 'Hernia' must be 0 or 1"):
        read_site_label_csv(p, CHEST_XRAY14)


def test_chestxray14_layout(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("00000001_000.png", "00000002_000.png"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(
            tmp_path / "images" / name
        )
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #\n00000001_000.png,Cardiomegaly|Effusion,0\n00000002_000.png,No Finding,0\n"
    )
    items = load_chestxray14(tmp_path)
    assert items[0].labels[CXR14_FINDINGS.index("Cardiomegaly")] == 1
    assert items[0].labels[CXR14_FINDINGS.index("Effusion")] == 1 and items[0].labels.sum() == 2
    assert items[1].labels.sum() == 0
    (tmp_path / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n00000001_000.png,Covid\n")
    with pytest.raises(ValueError, match="unknown finding 'Covid'"):
        load_chestxray14(tmp_path)


def test_csv_manifest_and_random_split(tmp_path):
    rows = []
    for i in range(10):
        Image.fromarray(np.full((32, 32), i * 20, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png," + ",".join(["1" if k == i % 14 else "0" for k in range(14)]))
    (tmp_path / "m.csv").write_text("path," + ",".join(CXR14_FINDINGS) + "\n" + "\n".join(rows) + "\n")
    items = load_csv_manifest(tmp_path / "m.csv", CHEST_XRAY14)
    train, val = split_items(items, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert {str(i.path) for i in train}.isdisjoint({str(i.path) for i in val})


def test_site_config_resolves_relative_paths(tmp_path):
    (tmp_path / "fedmed_site.json").write_text(
        json.dumps(
            {
                "site_name": "hospital-a",
                "data": {"format": "dicom", "root": "dicom", "labels_csv": "labels.csv"},
                "resources": {"num_threads": 1},
            }
        )
    )
    cfg = load_site_config(tmp_path / "fedmed_site.json")
    assert cfg.data.root == (tmp_path / "dicom").resolve() and cfg.num_threads == 1


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"data": {}}, "'site_name' must be a non-empty string"),
        ({"site_name": "h", "data": {"format": "nifti", "root": "x"}}, "data.format must be one of"),
        ({"site_name": "h", "data": {"format": "dicom", "root": "x"}}, "labels_csv is required"),
        ({"site_name": "h", "data": {"format": "chestxray14", "root": ""}}, "'data.root' must be a non-empty path"),
        (
            {"site_name": "h", "data": {"format": "chestxray14", "root": "x"}, "resources": {"num_threads": 0}},
            "num_threads",
        ),
    ],
)
def test_bad_site_config_names_the_key(tmp_path, raw, match):
    p = tmp_path / "fedmed_site.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        load_site_config(p)


GOOD = {"site_name": "h", "data": {"format": "chestxray14", "root": "x"}}


@pytest.mark.parametrize(
    "raw, match",
    [
        # a misspelt privacy block would otherwise silently drop the hospital's DP ceiling
        ({**GOOD, "privcy": {"preset": "strong"}}, r"unknown key\(s\) 'privcy' \(did you mean 'privacy'\?\)"),
        # nested blocks are as strict as the top level
        (
            {**GOOD, "data": {**GOOD["data"], "label_csv": "l.csv"}},
            r"data: unknown key\(s\) 'label_csv' \(did you mean 'labels_csv'\?\)",
        ),
        (
            {**GOOD, "resources": {"num_thread": 2}},
            r"resources: unknown key\(s\) 'num_thread' \(did you mean 'num_threads'\?\)",
        ),
        (
            {**GOOD, "privacy": {"preset": "strong", "epsilom": 2}},
            r"privacy: unknown key\(s\) 'epsilom' \(did you mean 'epsilon'\?\)",
        ),
        # nothing close: no guess, but the valid keys are listed
        ({**GOOD, "colour": 1}, r"unknown key\(s\) 'colour'; valid keys: data, hostile, privacy"),
    ],
)
def test_unknown_site_config_keys_are_refused_with_the_nearest_valid_key(tmp_path, raw, match):
    p = tmp_path / "fedmed_site.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        load_site_config(p)


def _dicom_config(tmp_path, tiny_hospitals, **data):
    p = tmp_path / "fedmed_site.json"
    site = tiny_hospitals / "hospital-a"
    p.write_text(
        json.dumps(
            {
                "site_name": "hospital-a",
                "data": {
                    "format": "dicom",
                    "root": str(site / "dicom"),
                    "labels_csv": str(site / "labels.csv"),
                    **data,
                },
            }
        )
    )
    return load_site_config(p)


def test_preflight_opens_the_labels_and_reads_one_image(tmp_path, tiny_hospitals):
    from fedmed.data.preflight import check_site_data

    found = check_site_data(_dicom_config(tmp_path, tiny_hospitals))
    assert found.task == "chest_xray14" and found.labelled == 16 and found.image.is_file()
    assert len(found.shape) == 2 and min(found.shape) > 0


@pytest.mark.parametrize(
    "data, error, match",
    [
        # the data not mounted (the usual mistake)
        ({"root": "/nonexistent/dicom"}, FileNotFoundError, "data.root /nonexistent/dicom does not exist"),
        # another hospital's labels: nothing under root has a row
        ({"labels_csv": "OTHER"}, ValueError, "with a row in data.labels_csv"),
    ],
)
def test_preflight_names_what_is_wrong(tmp_path, tiny_hospitals, data, error, match):
    from fedmed.data.preflight import check_site_data

    if data.get("labels_csv") == "OTHER":
        data = {"labels_csv": str(tiny_hospitals / "hospital-b" / "labels.csv")}
    with pytest.raises(error, match=match):
        check_site_data(_dicom_config(tmp_path, tiny_hospitals, **data))


def test_site_config_not_json(tmp_path):
    p = tmp_path / "fedmed_site.json"
    p.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_site_config(p)
    with pytest.raises(FileNotFoundError, match="site config not found"):
        load_site_config(tmp_path / "missing.json")


@pytest.mark.parametrize("site", ["hospital-a", "hospital-b", "hospital-c"])
def test_shipped_site_config_templates_are_valid(site):
    from pathlib import Path

    cfg = load_site_config(Path(__file__).resolve().parents[1] / "site_configs" / site / "fedmed_site.json")
    assert cfg.site_name == site and cfg.data.format == "dicom"
