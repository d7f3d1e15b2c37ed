"""Does federation pay? (scripts/bench_learning.py) and the generator options it uses to make hospitals hard."""

import csv
import re

import numpy as np
import pytest

from fedmed.data.synthetic import (
    DEFAULT_HOSPITALS,
    GLOBAL_TEST_SCANNER,
    HospitalSpec,
    generate_hospitals,
    render_chest,
    shift_scanner,
    specialist_priors,
)
from fedmed.data.synthetic_mri import BRAIN_MRI_FAMILY
from fedmed.job.constants import CXR14_FINDINGS


def _column_sums(labels_csv):
    with open(labels_csv) as f:
        rows = list(csv.DictReader(f))
    return {k: sum(int(r[k]) for r in rows) for k in CXR14_FINDINGS}, len(rows)


def test_specialist_priors_make_each_finding_common_at_one_hospital():
    priors = specialist_priors(3, 0.3, 0.01)
    assert len(priors) == 3 and all(len(p) == len(CXR14_FINDINGS) for p in priors)
    for i in range(len(CXR14_FINDINGS)):
        assert [p[i] for p in priors].count(0.3) == 1 and priors[i % 3][i] == 0.3
    with pytest.raises(ValueError, match="rare <= common"):
        specialist_priors(3, 0.01, 0.3)


def test_fainter_signs_scale_the_lesion_and_zero_removes_it():
    nodule = np.array([f == "Nodule" for f in CXR14_FINDINGS], dtype=int)
    none = render_chest(np.zeros(len(CXR14_FINDINGS), int), np.random.default_rng(5), 64)
    full = render_chest(nodule, np.random.default_rng(5), 64)
    faint = render_chest(nodule, np.random.default_rng(5), 64, sign_scale=0.4)
    gone = render_chest(nodule, np.random.default_rng(5), 64, sign_scale=0.0)
    assert np.array_equal(gone, none)
    assert 0 < np.abs(faint - none).sum() < np.abs(full - none).sum()
    with pytest.raises(ValueError, match="sign_scale"):
        render_chest(nodule, np.random.default_rng(5), 64, sign_scale=-1)


def test_scanner_shift_moves_hospitals_further_from_the_test_scanner():
    b = DEFAULT_HOSPITALS[1].scanner
    assert shift_scanner(b, GLOBAL_TEST_SCANNER, 1.0) is b
    far = shift_scanner(b, GLOBAL_TEST_SCANNER, 2.0)
    assert far.gamma == pytest.approx(GLOBAL_TEST_SCANNER.gamma + 2 * (b.gamma - GLOBAL_TEST_SCANNER.gamma))
    assert abs(far.noise_std - GLOBAL_TEST_SCANNER.noise_std) > abs(b.noise_std - GLOBAL_TEST_SCANNER.noise_std)
    assert far.photometric == b.photometric
    assert shift_scanner(b, GLOBAL_TEST_SCANNER, 100.0).gamma <= 3.0  # kept valid
    with pytest.raises(ValueError, match="shift"):
        shift_scanner(b, GLOBAL_TEST_SCANNER, -1.0)


def test_fixed_prevalence_is_checked(tmp_path):
    with pytest.raises(ValueError, match="prevalence has 2 values"):
        generate_hospitals(tmp_path / "a", [HospitalSpec("h", 4, prevalence=(0.1, 0.2))], num_test=2, size=32)
    spec = HospitalSpec("h", 4, BRAIN_MRI_FAMILY.hospitals[0].scanner, prevalence=(0.1,) * 4)
    with pytest.raises(ValueError, match="no per-site prevalence"):
        generate_hospitals(tmp_path / "b", [spec], num_test=2, size=32, family=BRAIN_MRI_FAMILY)
    assert not (tmp_path / "a" / "global_test").exists()


def test_generate_cli_makes_specialist_hospitals(tmp_path, capsys):
    from fedmed.cli.generate_hospitals import main

    out = tmp_path / "hard"
    args = ["--out", str(out), "--scale", "0.1", "--size", "32", "--num-test", "4", "--specialist", "0.6,0.0"]
    assert main(args + ["--sign-scale", "0.5", "--scanner-shift", "2"]) == 0
    # Rare = 0: a finding appears at another hospital only through ChestX-ray14's co-occurrence rules.
    co_occurring = {"Atelectasis", "Cardiomegaly", "Infiltration"}
    for i, site in enumerate(h.name for h in DEFAULT_HOSPITALS):
        sums, n = _column_sums(out / site / "labels.csv")
        own = [f for j, f in enumerate(CXR14_FINDINGS) if j % 3 == i]
        assert sum(sums[f] for f in own) > 0
        assert all(sums[f] == 0 for j, f in enumerate(CXR14_FINDINGS) if j % 3 != i and f not in co_occurring)
    for bad, match in (
        (["--specialist", "0.3"], "COMMON,RARE"),
        (["--specialist", "0.1,0.3"], "rare <= common"),
        (["--sign-scale", "-1"], "sign-scale"),
        (["--task", "brain_mri", "--specialist", "0.3,0.0"], "chest_xray14 only"),
    ):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "bad"), *bad])
        assert match in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_summary_gives_mean_spread_and_range():
    from fedmed.cli.bench_learning import summary

    assert summary([0.6, 0.7, 0.8]) == pytest.approx((0.7, 0.1, 0.6, 0.8))
    assert summary([0.6]) == (0.6, 0.0, 0.6, 0.6)


def test_bench_learning_writes_real_numbers(tmp_path):
    import json

    from fedmed.cli.bench_learning import HardHospitals, main, make_hospitals

    common = [
        "--data",
        str(tmp_path / "data"),
        "--per-site",
        "8,6,8",
        "--num-test",
        "24",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--batch-size",
        "8",
    ]
    first, second, out = tmp_path / "s3" / "b.md", tmp_path / "s4" / "b.md", tmp_path / "bench_learning.md"
    assert main(common + ["--seeds", "3", "--out", str(first)]) == 0
    assert main(common + ["--seeds", "4", "--no-curves", "--out", str(second)]) == 0
    # Two runs that split the seeds, reported as one.
    assert (
        main(["--combine", str(first.with_suffix(".json")), str(second.with_suffix(".json")), "--out", str(out)]) == 0
    )
    text = out.read_text()
    assert "python scripts/bench_learning.py --per-site 8,6,8" in text and "--combine" in text
    result = text.split("## Result")[1].split("\n## ")[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([a-z_\- ]+) \| ([0-9.]+) \| [0-9.]+ \|", result, re.M)}
    arms = {"hospital-a alone", "hospital-b alone", "hospital-c alone", "centralised", "fedavg", "geometric_median"}
    arms |= {"gm-fedadam", "gm-fedyogi", "gm-fedprox", "gm-scaffold", "fedavgm", "gm-fedavgm"}  # each algorithm
    assert arms <= set(rows)
    wall, cpu = text.split("## Gap to centralised at equal wall time (seed 3)")[1].split(
        "## Gap to centralised at equal CPU time (seed 3)"
    )
    row = r"\| [0-9.]+ \| [0-9.]+ \| [0-9.]+( \(ended\))? \| [+-][0-9.]+ \| [0-9.]+( \(ended\))? \| [+-][0-9.]+ \|$"
    for table in (wall, cpu):  # both ways: centralised at the arm's time, the arm at centralised's time
        assert all(re.search(rf"^\| {a} {row}", table, re.M) for a in ("fedavg", "gm-scaffold", "gm-fedavgm"))
    run3 = json.loads(first.with_suffix(".json").read_text())
    assert all(0 < c <= w * 1.5 + 1 for c, w in zip(run3["cpus"]["fedavg"], run3["walls"]["fedavg"])), "one thread"
    assert "SMOKE RUN" not in text
    assert all(0.0 <= float(v) <= 1.0 for v in rows.values())
    runs = [json.loads(p.with_suffix(".json").read_text()) for p in (first, second)]
    fedavg = re.search(r"^\| fedavg \|.*\| ([0-9.]+), ([0-9.]+) \|$", text, re.M)
    assert fedavg and [float(v) for v in fedavg.groups()] == pytest.approx(
        [r["results"]["fedavg"][0] for r in runs], abs=6e-4
    )
    assert re.search(r"^- fedavg: [+-][0-9.]+ vs centralised \((met|missed)\)", text, re.M)
    assert re.search(r"^\| centralised \| ([0-9.]+) \|$", text, re.M), "a learning curve (of one epoch here)"
    assert out.with_suffix(".png").stat().st_size > 1000
    # A rerun of the same arm and seed must reproduce its score: then it is listed, else refused.
    rerun = {
        **runs[1],
        "commands": ["a rerun"],
        "arms": ["fedavg"],
        "results": {"fedavg": runs[1]["results"]["fedavg"]},
    }
    (tmp_path / "rerun.json").write_text(json.dumps(rerun))
    assert (
        main(
            [
                "--combine",
                str(first.with_suffix(".json")),
                str(second.with_suffix(".json")),
                str(tmp_path / "rerun.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "same score to 1e-09 (the first run's times kept): fedavg seed 4." in out.read_text()
    joined = json.loads(out.with_suffix(".json").read_text())
    assert joined["reproduced"] == ["fedavg seed 4"] and joined["seeds"] == [3, 4], "the joined record is written"
    changed = {**rerun, "results": {"fedavg": [runs[1]["results"]["fedavg"][0] + 0.01]}}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="repeat seeds with different results: seed 4 of 'fedavg'"):
        main(["--combine", str(second.with_suffix(".json")), str(tmp_path / "changed.json"), "--out", str(out)])
    other = {**runs[1], "settings": {**runs[1]["settings"], "epochs": 3}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different settings"):
        main(["--combine", str(first.with_suffix(".json")), str(tmp_path / "other.json"), "--out", str(out)])
    # The same settings reuse the generated hospitals instead of writing them again.
    stamp = (tmp_path / "data" / "bench_learning.json").stat().st_mtime_ns
    assert make_hospitals(tmp_path / "data", HardHospitals((8, 6, 8), 0.3, 0.01, 1.0, 2.0, 24, 0, 64)) == [
        "hospital-a",
        "hospital-b",
        "hospital-c",
    ]
    assert (tmp_path / "data" / "bench_learning.json").stat().st_mtime_ns == stamp


def test_round_shards_cover_every_image_once_per_cycle_of_k_rounds():
    import torch

    from fedmed.cli.bench_learning import RoundClock, RoundShards

    class Images(torch.utils.data.Dataset):
        def __init__(self, n):
            self.labels = torch.arange(n)
            self.reseeded = []

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return torch.zeros(1), self.labels[i]

        def reseed(self, seed):
            self.reseeded.append(seed)

    base, clock = Images(10), RoundClock()
    shards = RoundShards(base, 3, clock, seed=7)
    cycles = []
    for _ in range(2):
        seen = []
        for _ in range(3):
            seen.append([int(shards[i][1]) for i in range(len(shards))])
            clock.round += 1
        assert sorted(len(s) for s in seen) == [3, 3, 4]  # near-equal shares
        assert sorted(i for s in seen for i in s) == list(range(10)), "one epoch over every image per cycle"
        cycles.append(seen)
    assert cycles[0] != cycles[1], "each cycle permutes afresh"
    shards.reseed(5)
    assert base.reseeded == [5], "the site's augmentation restart reaches the images"
    again = RoundShards(base, 3, RoundClock(), seed=7)
    assert [int(again[i][1]) for i in range(len(again))] == cycles[0][0], "the same seed, the same shares"
    for k in (0, 11):
        with pytest.raises(ValueError, match=r"rounds per epoch must be in \[1, 10\]"):
            RoundShards(base, k, clock, seed=7)


def test_parse_arm_takes_rounds_per_epoch_and_names_what_is_wrong():
    from fedmed.cli.bench_learning import federated_arms, parse_arm

    available = federated_arms(0.01, 0.01)
    assert parse_arm("fedavg", available) == available["fedavg"]
    four = parse_arm("gm-fedadam/4", available)
    assert four.rounds_per_epoch == 4 and four.algorithm == available["gm-fedadam"].algorithm
    for bad, match in (("fedsgd/4", "unknown arm 'fedsgd'"), ("fedavg/x", "must be an integer"), ("fedavg/0", ">= 1")):
        with pytest.raises(SystemExit, match=match):
            parse_arm(bad, available)


def test_an_arm_of_k_rounds_per_epoch_runs_k_times_the_rounds_on_a_kth_of_the_images(tmp_path):
    from fedmed.cli.bench_learning import Arm, HardHospitals, Schedule, make_hospitals, run_arm
    from fedmed.data.loading import load_test, load_train_val
    from fedmed.job.tasks import CHEST_XRAY14
    from fedmed.site.site_config import DataConfig

    data = tmp_path / "data"
    sites = make_hospitals(data, HardHospitals((10, 10), num_test=12, size=64))
    train = {
        s: load_train_val(DataConfig("dicom", data / s / "dicom", data / s / "labels.csv"), 32, 0, CHEST_XRAY14)[0]
        for s in sites
    }
    test = load_test(data / "global_test" / "dicom", data / "global_test" / "labels.csv", 32, CHEST_XRAY14)
    out = run_arm(train, test, Arm("fedavg", rounds_per_epoch=2), 0, Schedule(1, 1e-3, 4), curve=True)
    assert out["rounds"] == 2 and len(out["curve"]) == 1, "2 rounds make one epoch: one point of the curve"
    assert out["images_per_round"] == [8, 8], "each round half of the 2 x 8 training images"
    assert 0.0 <= out["auroc"] <= 1.0


def test_combine_joins_runs_that_split_the_arms_and_names_a_missing_seed(tmp_path):
    import json
    from pathlib import Path

    from fedmed.cli.bench_learning import main

    smoke = json.loads((Path(__file__).parents[1] / "docs" / "bench_learning_smoke.json").read_text())

    def only(record, arms, rename=None):
        rename = rename or {}
        out = dict(record, arms=[rename.get(a, a) for a in arms])
        for key in ("results", "finals", "walls", "curves", "curve_times"):
            out[key] = {rename.get(a, a): record[key][a] for a in arms if a in record[key]}
        return out

    base = only(smoke, ["hospital-a alone", "hospital-b alone", "centralised", "fedavg"])
    extra = only(smoke, ["gm-scaffold"], {"gm-scaffold": "fedavg/8"})  # as a --no-baselines run would write it
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    out = tmp_path / "joined.md"
    assert main(["--combine", str(tmp_path / "extra.json"), str(tmp_path / "base.json"), "--out", str(out)]) == 0
    text = out.read_text()
    result = text.split("## Result")[1].split("\n## ")[0]
    names = re.findall(r"^\| ([a-z0-9/_\- ]+) \| [0-9.]+ \|", result, re.M)
    assert names == ["hospital-a alone", "hospital-b alone", "centralised", "fedavg", "fedavg/8"], "baselines first"
    scaffold = smoke["results"]["gm-scaffold"][0]
    assert re.search(rf"^\| fedavg/8 \| {scaffold:.3f} \|", result, re.M)
    wall_row = r"^\| fedavg/8 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+( \(ended\))? \| [+-][0-9.]+ \| [0-9.]+( \(ended\))? \| [+-][0-9.]+ \|$"
    assert re.search(wall_row, text, re.M), "wall, both ways (the smoke record has no CPU times: no CPU table)"
    assert "equal CPU time" not in text
    assert re.search(r"^\| fedavg/8 \| [0-9.]+ \| [0-9.]+ \|$", text, re.M), "its learning curve"
    assert (
        main(
            [
                "--combine",
                str(tmp_path / "extra.json"),
                str(tmp_path / "base.json"),
                "--arms",
                "fedavg",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = out.read_text().split("## Result")[1].split("\n## ")[0]
    assert re.findall(r"^\| ([a-z0-9/_\- ]+) \| [0-9.]+ \|", result, re.M)[-2:] == ["centralised", "fedavg"], "--arms"
    (tmp_path / "other_seed.json").write_text(json.dumps({**extra, "seeds": [1]}))
    with pytest.raises(SystemExit, match="missing: hospital-a alone seed 1, .*fedavg/8 seed 0"):
        main(["--combine", str(tmp_path / "base.json"), str(tmp_path / "other_seed.json"), "--out", str(out)])
