"""fedmed.cli.pretrain_public (scripts/pretrain_public.py): a starting model from public data, in the file format --initial-weights reads."""

import pytest
import torch

from fedmed.cli import pretrain_public
from fedmed.models.network import build_densenet121, load_numpy_state


@pytest.fixture(scope="module")
def pretrain_script():
    return pretrain_public


def test_pretrained_weights_load_into_the_job_model_and_say_what_they_saw(pretrain_script, tiny_hospitals, tmp_path):
    site = tiny_hospitals / "hospital-a"
    out = tmp_path / "public.pt"
    rc = pretrain_script.main(
        [
            "--format",
            "dicom",
            "--root",
            str(site / "dicom"),
            "--labels-csv",
            str(site / "labels.csv"),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--image-size",
            "32",
            "--batch-size",
            "4",
        ]
    )
    assert rc == 0
    blob = torch.load(out, weights_only=True)
    meta = blob["meta"]
    assert meta["pretrained_on"] == str(site / "dicom") and meta["norm"] == "group" and meta["image_size"] == 32
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert meta["best_val_score"] == max(h["mean_auroc"] for h in meta["history"])
    model = build_densenet121(14, norm="group")
    load_numpy_state(model, {k: v.numpy() for k, v in blob["state_dict"].items()})  # what the persistor does
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(build_densenet121(14, norm="batch"), {k: v.numpy() for k, v in blob["state_dict"].items()})


def test_existing_weights_are_never_overwritten(pretrain_script, tiny_hospitals, tmp_path, capsys):
    out = tmp_path / "public.pt"
    out.write_bytes(b"keep me")
    site = tiny_hospitals / "hospital-a"
    with pytest.raises(SystemExit):
        pretrain_script.main(
            [
                "--format",
                "dicom",
                "--root",
                str(site / "dicom"),
                "--labels-csv",
                str(site / "labels.csv"),
                "--out",
                str(out),
            ]
        )
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    with pytest.raises(SystemExit):
        pretrain_script.main(["--format", "dicom", "--root", str(site / "dicom"), "--out", str(tmp_path / "x.pt")])
    assert "--labels-csv" in capsys.readouterr().err
