"""The lifetime ledger per image and per patient, charged once per (run, round), under the site's key: a re-tagged,
re-exported, subset or superset dataset composes with what its images and patients already spent; a resumed run's
round is not charged twice; an edit re-hashed without the key, a deleted or truncated ledger are found."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import RLELossless, generate_uid

from fedmed.cli import privacy_ledger as ledger_cli
from fedmed.data.labels import load_chestxray14
from fedmed.data.synthetic import ScannerProfile, make_dicom
from fedmed.privacy.accounting import epsilon_of
from fedmed.privacy.identity import IdentitySet, image_identifiers, pixel_digest
from fedmed.privacy.ledger import (
    ChargeConflict,
    LedgerBinding,
    LedgerEntry,
    LedgerError,
    LedgerHead,
    LifetimeBudgetExceeded,
    PrivacyLedger,
    _canonical,
    _sha256,
    head_extends,
)

REPO = Path(__file__).resolve().parents[1]
ROUND = (1.0, 0.25, 4)  # epsilon 4.87, 6.25, 7.33 after 1-3 rounds at delta 1e-5
ONE, TWO, THREE = (epsilon_of([ROUND] * n, 1e-5) for n in (1, 2, 3))


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (24, 20)).astype(np.uint16)


def _dicom(folder: Path, name: str, seed: int, patient: str, sop=None, institution="General", compress=False):
    ds = make_dicom(_pixels(seed), ScannerProfile(), patient, "1.2.3", "1.2.3.4", sop or f"1.2.3.4.{seed}")
    ds.InstitutionName = institution
    if compress:
        ds.compress(RLELossless)
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def _site(folder: Path, seeds_patients) -> list[Path]:
    return [_dicom(folder, f"{seed}.dcm", seed, patient) for seed, patient in seeds_patients]


def _ids(ledger: PrivacyLedger, paths, patients=None) -> IdentitySet:
    return ledger.dataset_identities((p, (patients or {}).get(p)) for p in paths)


def _charge(ledger, dataset, job, rounds, ceiling=None):
    return [ledger.charge(dataset, job, r, "dp_sgd", [ROUND], 1e-5, ceiling) for r in rounds]


def test_retagging_one_image_per_site_does_not_give_a_fresh_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path / "local" / "privacy_ledger.jsonl")
    paths = _site(tmp_path / "v1", [(1, "P1"), (2, "P1"), (3, "P2"), (4, "P3")])
    _charge(ledger, _ids(ledger, paths), "job-1", [0, 1])
    # The insider's re-export: one image's InstitutionName changed (new file bytes), another re-encoded (RLE) with a
    # new SOPInstanceUID; the same pixels and patients.
    retagged = _site(tmp_path / "v2", [(2, "P1"), (3, "P2"), (4, "P3")])
    retagged.append(_dicom(tmp_path / "v2", "1.dcm", 1, "P1", institution="Elsewhere"))
    retagged[0] = _dicom(tmp_path / "v2", "2.dcm", 2, "P1", sop=generate_uid(), compress=True)
    assert retagged[-1].read_bytes() != paths[0].read_bytes() and retagged[0].read_bytes() != paths[1].read_bytes()
    again = _ids(ledger, retagged)
    assert ledger.lifetime_epsilon(again, 1e-5) == pytest.approx(TWO, rel=1e-9)  # not 0: what its images spent
    with pytest.raises(LifetimeBudgetExceeded, match=rf"from {TWO:.3f} to {THREE:.3f} .*ceiling 7.0; 1 earlier"):
        _charge(ledger, again, "job-2", [0], ceiling=7.0)
    assert len(ledger.entries()) == 2 and len(list(ledger.index_dir.iterdir())) == 1  # refused: nothing written


def test_a_subset_and_a_superset_compose_with_what_their_images_spent(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    full = _site(tmp_path / "a", [(1, "P1"), (2, "P2"), (3, "P3"), (4, "P4")])
    _charge(ledger, _ids(ledger, full), "job-1", [0])
    subset = _ids(ledger, full[:2])
    assert ledger.lifetime_epsilon(subset, 1e-5) == pytest.approx(ONE, rel=1e-9)
    _charge(ledger, subset, "job-2", [0])  # images 1-2 now spent two rounds, 3-4 one
    newcomer = _site(tmp_path / "b", [(9, "P9")])
    superset = _ids(ledger, full + newcomer)
    assert ledger.lifetime_epsilon(superset, 1e-5) == pytest.approx(TWO, rel=1e-9)  # its most-charged images
    assert ledger.lifetime_epsilon(_ids(ledger, full[2:]), 1e-5) == pytest.approx(ONE, rel=1e-9)
    assert ledger.lifetime_epsilon(_ids(ledger, newcomer), 1e-5) == 0.0  # a new patient's image: nothing spent
    last = _charge(ledger, superset, "job-3", [0])[0]
    assert last.epsilon_after == pytest.approx(THREE, rel=1e-9)
    assert ledger.verify() is None


def test_a_patients_spend_covers_all_of_their_images(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    _charge(ledger, _ids(ledger, _site(tmp_path / "a", [(1, "P1")])), "job-1", [0, 1])
    # another image of P1 (other pixels, other SOP), and one of P2: P1's spend carries over, P2's does not
    later = _site(tmp_path / "b", [(5, "P1"), (6, "P2")])
    assert ledger.lifetime_epsilon(_ids(ledger, later), 1e-5) == pytest.approx(TWO, rel=1e-9)
    assert ledger.lifetime_epsilon(_ids(ledger, later[1:]), 1e-5) == 0.0


def test_chestxray14_images_are_named_by_their_pixels_and_the_csvs_patient(tmp_path):
    root = tmp_path / "cxr"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_pixels(i).astype(np.uint8)).save(root / "images" / f"{i}.png")
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Patient ID\n0.png,No Finding,17\n1.png,Effusion,17\n2.png,No Finding,\n"
    )
    items = load_chestxray14(root)
    assert [it.patient_id for it in items] == ["17", "17", None]
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    _charge(ledger, ledger.dataset_identities((it.path, it.patient_id) for it in items[:1]), "job-1", [0])
    # image 0 re-saved (another compression level, a text chunk): the same pixels, other bytes
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-exported")
    Image.open(items[0].path).save(root / "images" / "0b.png", compress_level=1, pnginfo=info)
    resaved = ledger.dataset_identities([(root / "images" / "0b.png", None)])
    assert ledger.lifetime_epsilon(resaved, 1e-5) == pytest.approx(ONE, rel=1e-9)
    same_patient = ledger.dataset_identities([(items[1].path, "17")])
    assert ledger.lifetime_epsilon(same_patient, 1e-5) == pytest.approx(ONE, rel=1e-9)
    assert ledger.lifetime_epsilon(ledger.dataset_identities([(items[2].path, None)]), 1e-5) == 0.0


def test_identities_are_pseudonymous_and_pixels_hash_alike_across_widths(tmp_path):
    path = _dicom(tmp_path, "a.dcm", 1, "PATIENT-0042", sop="1.2.840.99")
    kinds = dict(image_identifiers(path))
    assert kinds["sop"] == "1.2.840.99" and kinds["patient"] == "PATIENT-0042"
    assert pixel_digest(_pixels(1)) == pixel_digest(_pixels(1).astype(np.int32)) != pixel_digest(_pixels(2))
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    _charge(ledger, _ids(ledger, [path]), "job-1", [0])
    stored = "".join(p.read_text() for p in ledger.index_dir.iterdir()) + ledger.path.read_text()
    assert "PATIENT-0042" not in stored and "1.2.840.99" not in stored and kinds["pixels"] not in stored
    other_key = PrivacyLedger(tmp_path / "other" / "privacy_ledger.jsonl")
    assert _ids(other_key, [path]).digest != _ids(ledger, [path]).digest  # tokens depend on the site's key


# -- charge once per (run, round) ------------------------------------------------------------------------------


def test_a_resumed_runs_round_already_charged_is_not_charged_again(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    job1 = LedgerBinding(ledger, "d" * 64, "job-1", 1e-5, None, run="p1")
    for r in range(3):  # the server dies after round 2 was charged, before it recorded it
        job1.charge(r, "dp_sgd", [ROUND])
    job2 = LedgerBinding(ledger, "d" * 64, "job-2", 1e-5, None, run="p2")
    job2.continue_run(["job-1"])
    first = ledger.entries()[2]
    again = job2.charge(2, "dp_sgd", [ROUND])
    assert again == first and again.epsilon_after == pytest.approx(THREE, rel=1e-9)  # the recorded spend
    job2.charge(3, "dp_sgd", [ROUND])
    entries = ledger.entries()
    assert [(e.job_id, e.round, e.replay_of) for e in entries] == [
        ("job-1", 0, None),
        ("job-1", 1, None),
        ("job-1", 2, None),
        ("job-2", 2, 3),  # the replay, written, costing nothing
        ("job-2", 3, None),
    ]
    assert job2.lifetime_epsilon() == pytest.approx(epsilon_of([ROUND] * 4, 1e-5), rel=1e-9)
    with pytest.raises(ChargeConflict, match=r"job-1/3/dp_sgd was charged by job job-2 .*a resumed round must repeat"):
        job3 = LedgerBinding(ledger, "d" * 64, "job-3", 1e-5, None, run="p3")
        job3.continue_run(["job-1", "job-2"])
        job3.charge(3, "dp_sgd", [(2.0, 0.25, 4)])
    assert len(ledger.entries()) == 5 and ledger.verify() is None


def test_a_key_is_replayed_free_once_and_an_unrelated_job_is_always_charged(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    LedgerBinding(ledger, "d" * 64, "job-1", 1e-5, None).charge(0, "dp_sgd", [ROUND])
    for job in ("job-2", "job-3"):  # two crashes, two resumptions replaying round 0
        b = LedgerBinding(ledger, "d" * 64, job, 1e-5, None)
        b.continue_run(["job-1"])
        b.charge(0, "dp_sgd", [ROUND])
    # the simulator's runs share one job id and name no earlier jobs: never a replay
    LedgerBinding(ledger, "d" * 64, "job-1", 1e-5, None, run="another process").charge(0, "dp_sgd", [ROUND])
    entries = ledger.entries()
    assert [e.replay_of for e in entries] == [None, 1, None, None]
    assert entries[-1].epsilon_after == pytest.approx(THREE, rel=1e-9)  # one free replay, then charged in full


# -- the keyed chain, its head file, and the head a site reports -----------------------------------------------


def _charged(tmp_path, n=3) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "local" / "privacy_ledger.jsonl")
    _charge(ledger, "d" * 64, "job-1", range(n))
    return ledger


def _rehash(line: bytes) -> bytes:
    d = json.loads(line)
    d.pop("mac")
    d["history"] = [[50.0, 0.01, 1]]  # a forged, cheaper history
    return _canonical({**d, "mac": _sha256(_canonical(d))})


@pytest.mark.parametrize(
    "damage, match",
    [
        # an edit whose MAC is recomputed without the key (as sha256)
        (lambda led: _lines(led, lambda ls: ls[:-1] + [_rehash(ls[-1])]), "MAC does not match"),
        # the newest line removed whole: the chain is fine, the head file is not
        (lambda led: _lines(led, lambda ls: ls[:-1]), "holds 2 entries, but its head file records 3"),
        # the ledger deleted
        (lambda led: led.path.unlink(), "is missing or empty, but its head file records 3"),
        # the ledger deleted with its head file (the key stays)
        (
            lambda led: (led.path.unlink(), led.heads_path.unlink()),
            "head is missing while|is missing while the ledger is keyed",
        ),
        # the key removed: keyed lines cannot be checked
        (lambda led: led.key_path.unlink(), "key .* is missing"),
        # rewritten as unkeyed format-1 lines with a fresh sha256 chain (a downgrade): the head file catches it
        (lambda led: _downgrade(led), "is not the one its head file records"),
    ],
)
def test_edits_deletions_and_truncations_are_found_and_nothing_more_is_charged(tmp_path, capsys, damage, match):
    ledger = _charged(tmp_path)
    assert ledger.key_path.stat().st_mode & 0o777 == 0o600
    damage(ledger)
    assert re.search(match, ledger.verify() or ""), ledger.verify()
    with pytest.raises(LedgerError, match=match):
        _charge(ledger, "d" * 64, "job-2", [0])
    assert ledger_cli.main(["verify", str(ledger.path)]) == 1  # the officer's check, in-process (fast)
    assert "DAMAGED" in capsys.readouterr().err


def _lines(ledger, edit):
    lines = ledger.path.read_bytes().split(b"\n")[:-1]
    ledger.path.write_bytes(b"".join(line + b"\n" for line in edit(lines)))


def _legacy_lines(n: int) -> bytes:
    out, prev = b"", "0" * 64
    for i in range(1, n + 1):
        e = LedgerEntry(i, prev, "f" * 64, "old-job", i - 1, "dp_sgd", (ROUND,), 1e-5, 0.0, None, 0.0, format=1)
        line = _canonical({**e.fields(), "hash": _sha256(_canonical(e.fields()))})
        out += line + b"\n"
        prev = _sha256(line)
    return out


def _downgrade(ledger):
    ledger.path.write_bytes(_legacy_lines(3))


def test_a_format_1_ledger_is_read_its_charges_count_against_every_image_and_no_downgrade_after(tmp_path, capsys):
    path = tmp_path / "privacy_ledger.jsonl"
    path.write_bytes(_legacy_lines(2))  # a site's ledger from before per-image accounting
    ledger = PrivacyLedger(path)
    assert ledger.verify() is None and not ledger.key_path.exists()
    new = _charge(ledger, "d" * 64, "job-1", [0])[0]
    assert new.epsilon_after == pytest.approx(THREE, rel=1e-9)  # the two untraceable charges count too
    assert ledger.lifetime_epsilon("another dataset", 1e-5) == pytest.approx(TWO, rel=1e-9)
    assert [e.format for e in ledger.entries()] == [1, 1, 2] and ledger.verify() is None
    # an unkeyed line appended after a keyed one is refused
    last = ledger.path.read_bytes().split(b"\n")[-2]
    e = LedgerEntry(4, _sha256(last), "f" * 64, "x", 0, "dp_sgd", (ROUND,), 1e-5, 0.0, None, 0.0, format=1)
    with open(path, "ab") as f:
        f.write(_canonical({**e.fields(), "hash": _sha256(_canonical(e.fields()))}) + b"\n")
    assert "an unkeyed (format 1) line after keyed lines" in ledger.verify()
    assert ledger_cli.main(["show", str(path)]) == 1
    assert "unkeyed (format 1) line" in capsys.readouterr().err


def test_the_head_a_site_reports_shows_the_server_a_reset_ledger(tmp_path):
    ledger = _charged(tmp_path, 2)
    binding = LedgerBinding(ledger, "d" * 64, "job-1", 1e-5, None)
    before = binding.head_report()
    assert before.entries == 2 and before.lifetime_epsilon == pytest.approx(TWO, rel=1e-9)
    binding.charge(2, "dp_sgd", [ROUND])
    grown = binding.head_report(previous_count=before.entries)
    assert head_extends(before, grown) is None and head_extends(None, grown) is None
    assert head_extends(before, LedgerHead.from_wire(json.loads(json.dumps(grown.to_wire())))) is None
    assert "does not say what its ledger's entry 2 is" in head_extends(before, binding.head_report())
    # the hospital deletes its ledger, head file and key, and starts again: fine locally, visible to the server
    for p in (ledger.path, ledger.heads_path, ledger.key_path):
        p.unlink()
    binding.charge(0, "dp_sgd", [ROUND])
    reset = binding.head_report(previous_count=grown.entries)
    assert "holds 1 entries, 3 before: it was deleted, truncated or replaced" in head_extends(grown, reset)
    for r in (1, 2, 3):
        binding.charge(r, "dp_sgd", [ROUND])
    regrown = binding.head_report(previous_count=grown.entries)
    assert "entry 3 is not the one it reported before" in head_extends(grown, regrown)
    with pytest.raises(ValueError, match="not a ledger head report"):
        LedgerHead.from_wire({"entries": "x"})


def test_key_file_is_private_and_concurrent_first_use_makes_one_key(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    keys = {PrivacyLedger(ledger.path).open_key().key_id for _ in range(3)}
    assert len(keys) == 1 and oct(os.stat(ledger.key_path).st_mode & 0o777) == "0o600"
    assert ledger.verify() is None and ledger.entries() == []


def test_show_names_each_datasets_images_patients_and_the_replayed_round(tmp_path, capsys):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    ids = _ids(ledger, _site(tmp_path / "a", [(1, "P1"), (2, "P1"), (3, "P2")]))
    LedgerBinding(ledger, ids, "job-1", 1e-5, 9.0).charge(0, "dp_sgd", [ROUND])
    resumed = LedgerBinding(ledger, ids, "job-2", 1e-5, 9.0)
    resumed.continue_run(["job-1"])
    resumed.charge(0, "dp_sgd", [ROUND])
    assert ledger_cli.main(["show", str(ledger.path)]) == 0
    out = capsys.readouterr().out
    assert "(3 image(s), 2 patient(s)): 2 job(s)" in out and f"most-charged image or patient {ONE:.4f}" in out
    assert "resumed run: charged at entry 1, not again" in out
    assert ledger_cli.main(["verify", str(ledger.path)]) == 0
    assert "2 entries chained (2 keyed)" in capsys.readouterr().out


def test_the_pre_training_check_lets_a_free_replay_through_at_the_ceiling_and_refuses_the_next_round(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.jsonl")
    job1 = LedgerBinding(ledger, "d" * 64, "job-1", 1e-5, THREE)
    for r in range(3):  # the last of the lifetime budget, then the server dies before recording round 2
        job1.charge(r, "dp_sgd", [ROUND])
    job2 = LedgerBinding(ledger, "d" * 64, "job-2", 1e-5, THREE)
    job2.continue_run(["job-1"])
    assert job2.check_round(2, {"dp_sgd": [ROUND], "user_level": []}) == pytest.approx(THREE, rel=1e-9)
    with pytest.raises(LifetimeBudgetExceeded, match="over the site's lifetime ceiling"):
        job2.check([ROUND])  # counted in full, the same round would not pass
    with pytest.raises(LifetimeBudgetExceeded, match="over the site's lifetime ceiling"):
        job2.check_round(3, {"dp_sgd": [ROUND]})  # a round the run never charged
    with pytest.raises(ChargeConflict, match="a resumed round must repeat"):
        job2.check_round(2, {"dp_sgd": [(3.0, 0.25, 4)]})
    assert len(ledger.entries()) == 3  # checks write nothing
