"""The model card a model file carries: built from what a run did, refused when malformed, and the
not-for-clinical-use line it puts into every inference output."""

from types import SimpleNamespace

import pytest

from fedmed.models.model_card import (
    ModelCard,
    ModelCardBuilder,
    clinical_use_warning,
    data_is_synthetic,
    is_synthetic_dicom,
)


def _result(site, synthetic=None, epsilon=None):
    return SimpleNamespace(site=site, data_synthetic=synthetic, privacy={"epsilon": epsilon})


def test_builder_records_only_aggregated_sites_their_data_and_last_epsilon():
    b = ModelCardBuilder("chest_xray14", "geometric_median", "test", ("classifier.",))
    b.add_round(["a", "b"], [_result("a", True, 0.5), _result("b", False, None), _result("c", True, 9.0)])
    b.add_round(["a"], [_result("a", None, 1.25)])  # a said nothing this round: stays synthetic
    card = b.card()
    assert card.hospitals == ("a", "b") and card.rounds == 2  # c's update was never aggregated
    assert card.synthetic_sites == ("a",) and card.real_sites == ("b",) and card.unknown_sites == ()
    assert card.dp_epsilon == {"a": 1.25, "b": None} and card.he_layers == ("classifier.",)
    assert card.synthetic_data is True
    assert ModelCard.from_meta(card.to_meta()) == card  # round trip through the file's meta


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"a": False, "b": False}, None),  # all real: no warning
        ({"a": False, "b": True}, "NOT FOR CLINICAL USE: trained on synthetic data (b)"),
        ({"a": False, "b": None}, "NOT FOR CLINICAL USE: the model card cannot say"),  # b did not report
    ],
)
def test_warning_follows_what_the_sites_reported(flags, expected):
    b = ModelCardBuilder("chest_xray14", "fedavg", "test")
    b.add_round(list(flags), [_result(s, f) for s, f in flags.items()])
    warning = clinical_use_warning(b.card())
    assert warning is None if expected is None else warning.startswith(expected)


def test_no_card_is_not_for_clinical_use():
    assert clinical_use_warning(None).startswith("NOT FOR CLINICAL USE: this model file carries no model card")


@pytest.mark.parametrize(
    "raw, message",
    [
        ("synthetic", "model_card must be a mapping"),
        ({"hospitals": "hospital-a"}, "hospitals must be a list of site names"),
        ({"rounds": -1}, "rounds must be an integer >= 0"),
        ({"dp_epsilon": {"a": "lots"}}, "dp_epsilon must map sites to a number or null"),
    ],
)
def test_malformed_cards_are_refused_naming_the_field(raw, message):
    with pytest.raises(ValueError, match=message):
        ModelCard.from_meta(raw, "m.pt")


def test_synthetic_data_is_recognised_from_the_generator_or_the_declaration(tmp_path):
    import numpy as np
    from pydicom.uid import generate_uid

    from fedmed.data.synthetic import ScannerProfile, make_dicom

    paths = []
    for name, institution in (("gen.dcm", "fedmed-synthetic"), ("real.dcm", "ACME")):
        ds = make_dicom(
            np.zeros((8, 8), np.uint16),
            ScannerProfile(),
            "P",
            generate_uid(),
            generate_uid(),
            generate_uid(),
            {"BodyPartExamined": "CHEST", "ViewPosition": "PA"},
            "hospital-x",
        )
        if institution != "fedmed-synthetic":
            ds.Manufacturer = institution
        ds.save_as(tmp_path / name, enforce_file_format=True)
        paths.append(tmp_path / name)
    (tmp_path / "x.png").write_bytes(b"not dicom")
    assert is_synthetic_dicom(paths[0]) is True and is_synthetic_dicom(paths[1]) is False
    assert is_synthetic_dicom(tmp_path / "x.png") is None
    assert data_is_synthetic([paths[1]]) is False and data_is_synthetic([paths[1]], declared=True) is True
    assert data_is_synthetic([paths[1], paths[0]]) is True and data_is_synthetic([tmp_path / "x.png"]) is False
    assert data_is_synthetic([]) is None
