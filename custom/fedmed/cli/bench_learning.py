"""Benchmark: does federation pay? Each hospital alone, centralised training on the pooled data, FedAvg, the
geometric median, FedAvgM (fedavgm: a server step of n_sites times the mean move), and on the geometric median's
robust aggregate FedAdam, FedYogi, FedProx, SCAFFOLD and FedAvgM (fedmed.learning.algorithms), all with the same
total epochs, scored on one shared global test set (mean AUROC); the gap to centralised at equal epochs and at equal
wall and CPU time. Writes <out>.md, <out>.json and <out>.png.

    python scripts/bench_learning.py [--epochs 8] [--seeds 0,1,2] [--arms fedavg,gm-scaffold] [--out docs/bench_learning.md]
    python scripts/bench_learning.py --smoke --out docs/bench_learning_smoke.md   # proves it runs; measures nothing

The hospitals are made hard on purpose, so that a hospital alone has something to miss (see --help): few images
each, specialist label priors (each finding common at one hospital and rare at the others), fainter lesion signs,
scanners further apart, and a fresh DenseNet-121 (no pretraining). Every arm runs through fedmed.sim.inprocess.federate,
so every arm has the same training loop: a round = one local epoch (Adam, fresh each round, cosine learning-rate
decay over the epochs, the Executor's per-round seeds). "Alone" and "centralised" are one-site federations whose
aggregate is that site's model; "centralised" is one site holding every hospital's training images.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from fedmed.data.loading import load_test, load_train_val
from fedmed.data.synthetic import (
    DEFAULT_HOSPITALS,
    GLOBAL_TEST_SCANNER,
    chest_family,
    generate_hospitals,
    shift_scanner,
    specialist_priors,
)
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.learning.algorithms import FedAlgorithm, ServerOptimizer
from fedmed.learning.training import evaluate, round_share
from fedmed.models.network import build_densenet121, load_numpy_state
from fedmed.sim.inprocess import FederationPlan, federate
from fedmed.site.site_config import DataConfig

CENTRAL = "centralised"


@dataclass(frozen=True)
class Arm:
    """A federated arm: the round's aggregation and the algorithm on top of it (fedmed.learning.algorithms). rounds_per_epoch
    k > 1: k times the rounds, each site training on a 1/k share of its images each round (RoundShards), so the total
    epochs stay the same with shorter local work between aggregations (less client drift)."""

    aggregation: str = "fedavg"
    algorithm: FedAlgorithm = field(default_factory=FedAlgorithm)
    rounds_per_epoch: int = 1


class RoundClock:
    """The federation's current round index, advanced by run_arm after each round (the shards read it)."""

    def __init__(self):
        self.round = 0


class RoundShards(torch.utils.data.Dataset):
    """A site's training set seen a 1/k share per round: every k rounds (a cycle) the images are permuted afresh
    (seeded by the training seed, the site and the cycle) and cut into k near-equal shares; round r trains on share
    r mod k, so each cycle of k rounds is one epoch over every image. The site's own round code (fedmed.site.site_round)
    is unchanged: it trains one local epoch over the dataset it is given, which is this round's share."""

    def __init__(self, base, k: int, clock: RoundClock, seed: int):
        if k < 1 or k > len(base):
            raise ValueError(f"rounds per epoch must be in [1, {len(base)}] (the site's images), got {k}")
        self.base, self.k, self.clock, self.seed = base, k, clock, seed
        self._cached = (None, None)

    def _share(self) -> np.ndarray:
        r = self.clock.round
        if self._cached[0] != r:  # the job option's shares (rounds_per_epoch), keyed by the bench's round clock
            self._cached = (r, round_share(len(self.base), r, self.k, self.seed))
        return self._cached[1]

    def __len__(self) -> int:
        return len(self._share())

    def __getitem__(self, i):
        return self.base[int(self._share()[i])]

    def reseed(self, seed: int) -> None:
        if hasattr(self.base, "reseed"):
            self.base.reseed(seed)


def parse_arm(name: str, available: dict) -> Arm:
    """'<arm>' or '<arm>/<k>' (k rounds per epoch, k >= 1) -> the Arm; SystemExit naming what was wrong."""
    base, _, k = name.partition("/")
    if base not in available:
        raise SystemExit(f"--arms: unknown arm {base!r} in {name!r}; choose from {list(available)} (optionally /K)")
    if not k:
        return available[base]
    try:
        rounds = int(k)
    except ValueError:
        raise SystemExit(f"--arms: {name!r}: rounds per epoch after '/' must be an integer, got {k!r}") from None
    if rounds < 1:
        raise SystemExit(f"--arms: {name!r}: rounds per epoch must be >= 1, got {rounds}")
    return replace(available[base], rounds_per_epoch=rounds)


def federated_arms(server_lr: float, proximal_mu: float, n_sites: int = 3) -> dict:
    """The federated arms: FedAvg, the geometric median (gm, with the deployed trust rule), each algorithm on the
    geometric median's robust aggregate, and fedavgm: FedAvg with a server learning rate of n_sites (no momentum):
    the sites' mean move times the number of sites, about the sum of their moves, as centralised training takes
    the same steps one after the other in an epoch."""
    gm = "geometric_median"
    return {
        "fedavg": Arm("fedavg"),
        "fedavgm": Arm("fedavg", FedAlgorithm(ServerOptimizer("fedavgm", lr=float(n_sites), beta1=0.0))),
        gm: Arm(gm),
        "gm-fedadam": Arm(gm, FedAlgorithm(ServerOptimizer("fedadam", lr=server_lr))),
        "gm-fedyogi": Arm(gm, FedAlgorithm(ServerOptimizer("fedyogi", lr=server_lr))),
        "gm-fedprox": Arm(gm, FedAlgorithm(proximal_mu=proximal_mu)),
        "gm-scaffold": Arm(gm, FedAlgorithm(scaffold=True)),
        "gm-fedavgm": Arm(gm, FedAlgorithm(ServerOptimizer("fedavgm", lr=float(n_sites), beta1=0.0))),
    }


FEDERATED = tuple(federated_arms(0.01, 0.01))


@dataclass(frozen=True)
class Schedule:
    """Every arm's training: total epochs (federated: rounds of one local epoch), Adam's lr, batch size."""

    epochs: int
    lr: float
    batch_size: int


TOLERANCE = 0.02  # the target: federated within this much mean AUROC of centralised
REPRODUCED = 1e-9  # two runs of one arm and seed (one torch thread, deterministic) agree to this much AUROC


@dataclass(frozen=True)
class HardHospitals:
    """How the hard hospitals are made: images per hospital, specialist priors (COMMON at one hospital, RARE at the
    others), lesion contrast, scanner distance from the test scanner, test-set size, data seed, image size."""

    per_site: tuple
    common: float = 0.3
    rare: float = 0.01
    sign_scale: float = 1.0
    scanner_shift: float = 2.0
    num_test: int = 200
    seed: int = 0
    size: int = 64


def make_hospitals(root: Path, spec: HardHospitals) -> list:
    """Generate the hard hospitals once into root (regenerated when the settings differ); returns site names."""
    per_site, common, rare, num_test, seed, size = (
        spec.per_site,
        spec.common,
        spec.rare,
        spec.num_test,
        spec.seed,
        spec.size,
    )
    sign_scale, scanner_shift = spec.sign_scale, spec.scanner_shift
    settings = dict(
        per_site=list(per_site),
        specialist=[common, rare],
        sign_scale=sign_scale,
        scanner_shift=scanner_shift,
        num_test=num_test,
        seed=seed,
        size=size,
    )
    stamp = root / "bench_learning.json"
    names = [f"hospital-{chr(ord('a') + i)}" for i in range(len(per_site))]
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return names
    if stamp.exists() or (root.exists() and any(root.iterdir())):
        if not stamp.exists():
            raise SystemExit(f"{root} holds other files; choose an empty --data folder")
        import shutil

        shutil.rmtree(root)  # our own earlier hospitals, made with other settings
    priors = specialist_priors(len(per_site), common, rare)
    specs = [
        replace(
            DEFAULT_HOSPITALS[i % len(DEFAULT_HOSPITALS)],
            name=names[i],
            num_images=n,
            scanner=shift_scanner(
                DEFAULT_HOSPITALS[i % len(DEFAULT_HOSPITALS)].scanner, GLOBAL_TEST_SCANNER, scanner_shift
            ),
            prevalence=priors[i],
        )
        for i, n in enumerate(per_site)
    ]
    with tqdm(total=sum(per_site) + num_test, desc="generating hospitals", unit="img") as bar:
        generate_hospitals(
            root,
            specs,
            num_test=num_test,
            seed=seed,
            size=size,
            progress=bar.update,
            family=chest_family(sign_scale=sign_scale),
        )
    stamp.write_text(json.dumps(settings))
    return names


def pooled(datasets: list):
    """Every hospital's training images in one dataset: the centralised arm's data (images are already decoded)."""
    out = copy.copy(datasets[0])
    out.images = torch.cat([d.images for d in datasets])
    out.labels = torch.cat([d.labels for d in datasets])
    return out


def run_arm(train_sets: dict, test_set, arm: Arm, seed: int, schedule: Schedule, curve: bool) -> dict:
    """One arm: final per-finding AUROCs on the global test set, its training wall time (the in-process federation
    runs the sites one after the other; the curve's test scoring left out) and, when asked, its mean AUROC and
    elapsed training time after every epoch."""
    model = build_densenet121(CHEST_XRAY14.num_outputs)
    points, times, cpu_times, scoring_cpu = [], [], [], 0.0
    k = arm.rounds_per_epoch
    clock = RoundClock()
    if k > 1:
        train_sets = {s: RoundShards(d, k, clock, seed * 1000 + i) for i, (s, d) in enumerate(train_sets.items())}
    t0, scoring, cpu0 = time.perf_counter(), 0.0, time.process_time()

    def on_round(report):
        nonlocal scoring, scoring_cpu
        clock.round += 1
        if curve and report.aggregated and clock.round % k == 0:  # the curve's points: after each epoch
            t, c = time.perf_counter(), time.process_time()
            times.append(t - t0 - scoring)
            cpu_times.append(c - cpu0 - scoring_cpu)
            load_numpy_state(model, report.params)
            points.append(evaluate(model, test_set, CHEST_XRAY14).mean_auroc)
            scoring += time.perf_counter() - t
            scoring_cpu += time.process_time() - c

    plan = FederationPlan(
        task=CHEST_XRAY14,
        rounds=schedule.epochs * k,
        aggregation=arm.aggregation,
        use_trust=arm.aggregation == "geometric_median",  # the deployed rule; FedAvg takes every valid update
        lr=schedule.lr,
        batch_size=schedule.batch_size,
        seed=seed,
        min_clients=1 if len(train_sets) == 1 else 2,
        algorithm=arm.algorithm,
    )
    fed = federate(train_sets, test_set, plan, on_round=on_round)
    wall = time.perf_counter() - t0 - scoring
    cpu = time.process_time() - cpu0 - scoring_cpu  # one torch thread: the training's CPU time, less load-dependent
    if fed.stopped:
        raise RuntimeError(f"{arm} over {sorted(train_sets)} stopped: {fed.stopped}")
    load_numpy_state(model, fed.params)
    final = evaluate(model, test_set, CHEST_XRAY14)
    return {
        "auroc": final.mean_auroc,
        "aurocs": final.aurocs,
        "curve": points,
        "times": times,
        "wall": wall,
        "cpu": cpu,
        "cpu_times": cpu_times,
        "rounds": len(fed.reports),
        "images_per_round": [sum(rep.used_samples.values()) for rep in fed.reports],
    }


def at_time(times: list, values: list, t: float) -> tuple:
    """(the curve's value at elapsed time t, linearly interpolated, capped at its ends; whether t was past its end)."""
    if not times:
        return float("nan"), False
    return float(np.interp(t, times, values)), t > times[-1]


def specialty_split(aurocs: dict, site_index: int, n_sites: int) -> tuple:
    """Mean AUROC over the findings common at that hospital, and over the findings rare there."""
    findings = list(CHEST_XRAY14.classes)
    own = [aurocs[f] for i, f in enumerate(findings) if f in aurocs and i % n_sites == site_index]
    other = [aurocs[f] for i, f in enumerate(findings) if f in aurocs and i % n_sites != site_index]
    return float(np.mean(own)) if own else float("nan"), float(np.mean(other)) if other else float("nan")


def summary(values: list) -> tuple:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, sd, min(values), max(values)


def plot(arms: list, results: dict, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    means = [summary(results[a])[0] for a in arms]
    lo = [summary(results[a])[0] - summary(results[a])[2] for a in arms]
    hi = [summary(results[a])[3] - summary(results[a])[0] for a in arms]
    colors = ["grey" if a.endswith("alone") else ("tab:blue" if a == CENTRAL else "tab:green") for a in arms]
    colors = [c if not a.startswith("gm-") else "tab:olive" for a, c in zip(arms, colors)]
    ax.bar(range(len(arms)), means, yerr=[lo, hi], color=colors, capsize=4)
    ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
    tops = [m + h for m, h in zip(means, hi)]
    for i, (m, top) in enumerate(zip(means, tops)):  # the mean written on each bar: the figure reads alone
        ax.text(i, top + 0.004, f"{m:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(max(0.0, min(0.45, min(means) - 0.05)), min(1.0, max(tops) + 0.06))
    ax.axhline(0.5, color="k", lw=0.5, ls=":")
    if CENTRAL in results:  # the target line: within TOLERANCE of centralised
        target = summary(results[CENTRAL])[0] - TOLERANCE
        ax.axhline(target, color="tab:blue", lw=0.8, ls="--", label=f"centralised - {TOLERANCE}")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("global test mean AUROC")
    ax.set_title("final model: mean over seeds, whiskers min-max", fontsize=9)
    palette = plt.get_cmap("tab20").colors  # more arms than tab10's colours: no two curves alike
    for i, (a, c) in enumerate(curves.items()):
        style = dict(color="k", lw=2.2) if a == CENTRAL else dict(color=palette[i % len(palette)], lw=1.3)
        ax2.plot(range(1, len(c) + 1), c, marker="o", ms=3, label=a, ls="--" if a.endswith("alone") else "-", **style)
    ax2.set_xlabel("epoch (federated: 1 round, or k rounds for an arm named /k)")
    ax2.set_ylabel("global test mean AUROC")
    ax2.set_title("learning curves, one seed", fontsize=9)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.axhline(0.5, color="k", lw=0.5, ls=":")
    if curves:
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the axes: no curve hidden
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the rotated arm names and the legend kept whole
    plt.close(fig)


def parse_ints(text: str, what: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"{what} is empty")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/bench_learning"), help="where the hospitals are made")
    p.add_argument("--per-site", default="75,60,90", help="images per hospital (20%% of each is its validation split)")
    p.add_argument("--num-test", type=int, default=200, help="images in the shared global test set")
    p.add_argument(
        "--specialist",
        default="0.3,0.01",
        metavar="COMMON,RARE",
        help="finding i has prevalence COMMON at hospital i mod n, RARE at the others",
    )
    p.add_argument("--sign-scale", type=float, default=1.0, help="lesion sign contrast (1 = the generator default)")
    p.add_argument(
        "--scanner-shift", type=float, default=2.0, help="scanner distance from the test scanner (1 = default)"
    )
    p.add_argument("--epochs", type=int, default=6, help="total epochs of every arm (federated: rounds of 1 epoch)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (model start, shuffling, augmentation)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--server-lr", type=float, default=0.01, help="FedAdam / FedYogi server learning rate")
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu")
    p.add_argument(
        "--arms",
        help=f"comma-separated federated arms to run (default all: {','.join(FEDERATED)}); the hospitals alone and "
        "centralised always run; with --combine: report only these federated arms (and the baselines)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest run that exercises every arm (2 hospitals of 8 images, 16 test images, 2 epochs, one "
        "seed, 32 px), its report labelled SMOKE RUN: it proves the bench runs, it measures nothing",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--no-curves", action="store_true", help="skip the per-epoch test scores of the first seed")
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="run only the federated arms (the hospitals alone and centralised come from another run of the same "
        "settings and seeds, joined with --combine)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/bench_learning.md"))
    p.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="write the report from the result files (<out>.json) of runs that split the seeds between them",
    )
    a = p.parse_args(argv)
    if a.smoke:
        a.per_site, a.num_test, a.epochs, a.seeds, a.image_size, a.batch_size = "8,8", 16, 2, "0", 32, 4
    if a.combine:
        keep = [x.strip() for x in a.arms.split(",") if x.strip()] if a.arms else None
        record = combine([json.loads(path.read_text()) for path in a.combine], keep)
        write_report(record, a.out)
        a.out.with_suffix(".json").write_text(json.dumps(record, indent=1))  # the joined record beside its report
        return 0
    per_site = parse_ints(a.per_site, "--per-site")
    seeds = parse_ints(a.seeds, "--seeds")
    try:
        common, rare = (float(v) for v in a.specialist.split(","))
    except ValueError:
        raise SystemExit(f"--specialist takes COMMON,RARE, got {a.specialist!r}") from None
    if len(per_site) < 2 or min(per_site) < 4:
        raise SystemExit(f"--per-site needs at least two hospitals of >= 4 images, got {per_site}")
    if a.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {a.epochs}")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    size = max(a.image_size, 64)
    sites = make_hospitals(
        a.data,
        HardHospitals(tuple(per_site), common, rare, a.sign_scale, a.scanner_shift, a.num_test, a.data_seed, size),
    )
    train = {
        s: load_train_val(
            DataConfig("dicom", a.data / s / "dicom", a.data / s / "labels.csv"),
            a.image_size,
            a.data_seed,
            CHEST_XRAY14,
        )[0]
        for s in sites
    }
    test = load_test(
        a.data / "global_test" / "dicom", a.data / "global_test" / "labels.csv", a.image_size, CHEST_XRAY14
    )
    available = federated_arms(a.server_lr, a.proximal_mu, len(sites))
    chosen = [x.strip() for x in a.arms.split(",") if x.strip()] if a.arms else list(available)
    if not chosen:
        raise SystemExit(f"--arms is empty; choose from {list(available)}")
    arms = {} if a.no_baselines else {f"{s} alone": ({s: train[s]}, Arm()) for s in sites}
    if not a.no_baselines:
        arms[CENTRAL] = ({"pooled": pooled([train[s] for s in sites])}, Arm())
    for name in chosen:
        arms[name] = (train, parse_arm(name, available))
    record = {
        "settings": {k: getattr(a, k) for k in SETTINGS},
        "commands": [],
        "environment": environment(),
        "sites": sites,
        "n_train": {s: len(train[s]) for s in sites},
        "n_test": len(test),
        "arms": list(arms),
        "seeds": [],
        "results": {arm: [] for arm in arms},
        "finals": {arm: [] for arm in arms},
        "curves": {},
        "curve_times": {},
        "walls": {arm: [] for arm in arms},
        "cpus": {arm: [] for arm in arms},
        "curve_cpu_times": {},
        "curve_seed": None,
        "wall_s": [0.0],
        "smoke": bool(a.smoke),
    }
    schedule = Schedule(a.epochs, a.lr, a.batch_size)
    bar = tqdm(total=len(seeds) * len(arms), desc="arms x seeds")
    for k, seed in enumerate(seeds):
        curve = not a.no_curves and k == 0
        for arm, (sets, spec) in arms.items():
            out = run_arm(sets, test, spec, seed, schedule, curve)
            record["results"][arm].append(out["auroc"])
            record["finals"][arm].append(out["aurocs"])
            record["walls"][arm].append(out["wall"])
            record["cpus"][arm].append(out["cpu"])
            if out["curve"]:
                record["curves"][arm] = out["curve"]
                record["curve_times"][arm] = out["times"]
                record["curve_cpu_times"][arm] = out["cpu_times"]
            bar.update(1)
            tqdm.write(f"seed {seed} {arm}: {out['auroc']:.3f}")
            # Each arm as it finishes: a run stopped mid-seed still leaves what it measured (not a report).
            partial = {"seed": seed, "arm": arm, **out}
            a.out.parent.mkdir(parents=True, exist_ok=True)
            with a.out.with_suffix(".arms.jsonl").open("a") as f:
                f.write(json.dumps(partial) + "\n")
        record["seeds"].append(seed)
        record["curve_seed"] = seeds[0] if record["curves"] else None
        record["wall_s"] = [time.time() - t0]
        record["commands"] = [command(a, record["seeds"], a.out)]
        # Written after every seed: a long run stopped early still leaves the seeds it finished.
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
        if not a.no_baselines:  # without them there is nothing to compare against: the JSON waits for --combine
            write_report(record, a.out)
    bar.close()
    return 0


SETTINGS = (
    "server_lr",
    "proximal_mu",
    "per_site",
    "num_test",
    "specialist",
    "sign_scale",
    "scanner_shift",
    "epochs",
    "data_seed",
    "image_size",
    "lr",
    "batch_size",
)


def command(a, seeds, out) -> str:
    return (
        f"python scripts/bench_learning.py --per-site {a.per_site} --num-test {a.num_test} --specialist {a.specialist} "
        f"--sign-scale {a.sign_scale} --scanner-shift {a.scanner_shift} --epochs {a.epochs} "
        f"--seeds {','.join(map(str, seeds))} --image-size {a.image_size} --batch-size {a.batch_size} --lr {a.lr}"
        + f" --server-lr {a.server_lr} --proximal-mu {a.proximal_mu}"
        + (f" --arms {a.arms}" if a.arms else "")
        + (" --no-curves" if a.no_curves else "")
        + (" --no-baselines" if a.no_baselines else "")
        + f" --out {out}"
    )


def environment() -> str:
    return (
        f"{platform.machine()} CPU, {os.cpu_count()} cores shared with other jobs, torch {torch.__version__} on "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}"
    )


def combine(records: list, keep: Optional[list] = None) -> dict:
    """One record from runs of the same settings that split the seeds or the arms between them (e.g. a later run of
    one more arm with --no-baselines on the same seeds); keep: only these federated arms (None: all). Every arm must then have every seed; an arm's seed in more
    than one run must have the same score in each (a rerun of a deterministic arm: reproduced, listed in the record
    and the report), the first run's wall and CPU time kept (give the run whose times should count first)."""
    records = sorted(records, key=lambda r: CENTRAL not in r["arms"])  # the runs with the baselines first
    first = records[0]
    for r in records[1:]:
        if r["settings"] != first["settings"]:
            raise SystemExit(f"runs with different settings cannot be combined: {first['settings']} vs {r['settings']}")
    arms, seeds, values, reproduced = [], [], {}, []
    for r in records:
        walls, cpus = r.get("walls", {}), r.get("cpus", {})
        for arm in r["arms"]:
            if keep is not None and arm not in keep and arm != CENTRAL and not arm.endswith(" alone"):
                continue  # --arms with --combine: the baselines and these arms (a run may hold arms of one seed)
            arms += [arm] if arm not in arms else []
            for k, seed in enumerate(r["seeds"]):
                seeds += [seed] if seed not in seeds else []
                score = r["results"][arm][k]
                if (arm, seed) in values:
                    earlier = values[arm, seed][0]
                    if abs(earlier - score) > REPRODUCED:
                        raise SystemExit(
                            f"the runs repeat seeds with different results: seed {seed} of {arm!r} scored "
                            f"{earlier!r} in one run and {score!r} in another"
                        )
                    reproduced.append(f"{arm} seed {seed}")
                    continue
                wall, cpu = walls.get(arm, []), cpus.get(arm, [])
                values[arm, seed] = (
                    score,
                    r["finals"][arm][k],
                    wall[k] if k < len(wall) else None,
                    cpu[k] if k < len(cpu) else None,
                )
    missing = [f"{arm} seed {seed}" for arm in arms for seed in seeds if (arm, seed) not in values]
    if missing:
        raise SystemExit(f"the runs do not cover every arm on every seed; missing: {', '.join(missing)}")
    baselines = [a for a in arms if a == CENTRAL or a.endswith(" alone")]
    arms = baselines + [a for a in arms if a not in baselines]  # the hospitals alone and centralised first
    out = dict(first)
    out["arms"], out["seeds"] = arms, seeds
    out["results"] = {arm: [values[arm, s][0] for s in seeds] for arm in arms}
    out["finals"] = {arm: [values[arm, s][1] for s in seeds] for arm in arms}
    walls = {arm: [values[arm, s][2] for s in seeds] for arm in arms}
    out["walls"] = {arm: w for arm, w in walls.items() if None not in w}  # an old run without walls: no wall table
    cpus = {arm: [values[arm, s][3] for s in seeds] for arm in arms}
    out["cpus"] = {
        arm: c for arm, c in cpus.items() if any(v is not None for v in c)
    }  # None: an older run, no CPU time
    out["reproduced"] = reproduced
    with_curves = [r for r in records if r["curves"]]
    out["curve_seed"] = with_curves[0]["curve_seed"] if with_curves else None
    out["curves"], out["curve_times"], out["curve_cpu_times"] = {}, {}, {}
    for r in reversed(with_curves):  # every run's curves of that one seed (runs that split the arms); the first wins
        if r["curve_seed"] == out["curve_seed"]:
            out["curves"].update(r["curves"])
            out["curve_times"].update(r.get("curve_times", {}))
            out["curve_cpu_times"].update(r.get("curve_cpu_times", {}))
    out["curves"] = {a: out["curves"][a] for a in arms if a in out["curves"]}
    out["smoke"] = any(r.get("smoke") for r in records)
    out["commands"] = [c for r in records for c in r["commands"]]
    out["wall_s"] = [w for r in records for w in r["wall_s"]]
    return out


def equal_wall_time(record: dict, federated: list) -> list:
    """The gap to centralised at equal training time (curve seed), both ways: each arm's final score against
    centralised's learning curve at the time the arm took, and the arm's own learning curve at centralised's whole
    time; by wall time and, where the runs recorded it, by CPU time (one torch thread: the work done, which a loaded
    machine stretches less than the wall)."""
    curves, seed = record["curves"], record["curve_seed"]
    if seed is None or CENTRAL not in curves:
        return []
    k = record["seeds"].index(seed)
    lines = []
    for clock, key, curve_key in (("wall", "walls", "curve_times"), ("CPU", "cpus", "curve_cpu_times")):
        times, spent = record.get(curve_key, {}), record.get(key, {})
        if CENTRAL not in times or not all(spent.get(a) and spent[a][k] is not None for a in (CENTRAL, *federated)):
            continue
        c_time = spent[CENTRAL][k]
        lines += [
            "",
            f"## Gap to centralised at equal {clock} time (seed {seed})",
            "",
            f"Training {clock} time of each arm (the in-process federation trains its sites one after the other, as "
            "one machine would; deployed hospitals train at once, so a federated round's wall there is about its "
            "slowest site's share; test scoring left out), centralised's score after the same time from its "
            "learning curve, and the arm's own score at centralised's whole time from the arm's curve (interpolated "
            "between epochs; 'ended' where the time is past the end of that curve, which then gives its last value):",
            "",
            f"| arm | {clock} (s) | its final AUROC | centralised at that time | gap | the arm at centralised's "
            f"{c_time:.0f} s | gap |",
            "|---|---|---|---|---|---|---|",
            f"| {CENTRAL} | {c_time:.1f} | {record['results'][CENTRAL][k]:.3f} | - | - | - | - |",
        ]
        c_final = record["results"][CENTRAL][k]
        for arm in federated:
            used, final = spent[arm][k], record["results"][arm][k]
            at, past = at_time(times[CENTRAL], curves[CENTRAL], used)
            row = f"| {arm} | {used:.1f} | {final:.3f} | {at:.3f}{' (ended)' if past else ''} | {final - at:+.3f} |"
            if arm in times and arm in curves:
                own, own_past = at_time(times[arm], curves[arm], c_time)
                row += f" {own:.3f}{' (ended)' if own_past else ''} | {own - c_final:+.3f} |"
            else:
                row += " - | - |"
            lines.append(row)
    return lines


def write_report(record: dict, out: Path) -> None:
    st = record["settings"]
    sites, names, results = record["sites"], record["arms"], record["results"]
    seeds, curves = record["seeds"], record["curves"]
    central = summary(results[CENTRAL])[0]
    best_alone = max(summary(results[f"{s} alone"])[0] for s in sites)
    common, rare = st["specialist"].split(",")
    walls = ", ".join(f"{w:.0f} s" for w in record["wall_s"])
    federated = [n for n in names if n != CENTRAL and not n.endswith(" alone")]
    smoke = (
        [
            "**SMOKE RUN: the smallest size (`--smoke`), to prove the bench and every arm run. These numbers measure "
            "nothing; the measured figures come from a full run (see docs/bench_learning.md).**",
            "",
        ]
        if record.get("smoke")
        else []
    )
    lines = [
        "# bench_learning: does federation pay?" + (" (SMOKE RUN)" if record.get("smoke") else ""),
        "",
        *smoke,
        "Command"
        + ("s (run side by side, each a share of the seeds)" if len(record["commands"]) > 1 else "")
        + ": "
        + "; ".join(f"`{c}`" for c in record["commands"])
        + (
            f"; then `python scripts/bench_learning.py --combine <their .json> --out {out}`"
            if len(record["commands"]) > 1
            else ""
        ),
        "",
        f"Environment: {record['environment']}; wall time {walls} (including data generation when not cached).",
        "",
        "## Set-up",
        "",
        f"- {len(sites)} synthetic hospitals ("
        + ", ".join(f"{s}: {n} training images" for s, n in record["n_train"].items())
        + f"; 20% of each generated set is its validation split, unused here), a shared global test set of "
        f"{record['n_test']} images from the global prior and the test scanner, {st['image_size']} px.",
        f"- Hard on purpose: specialist label priors (finding i has prevalence {common} at hospital i mod "
        f"{len(sites)} and {rare} at the others: each hospital sees few positives of two thirds of the findings); "
        f"lesion signs at {st['sign_scale']}x contrast; scanners {st['scanner_shift']}x as far from the test scanner as "
        "the default hospitals (gamma, contrast, noise, blur; one hospital writes MONOCHROME1); few images; a fresh "
        "DenseNet-121 (BatchNorm, no pretraining).",
        f"- Same total epochs: every arm trains {st['epochs']} epochs over its data (the federations: {st['epochs']} "
        "rounds of one local epoch); the same loop for all (fedmed.sim.inprocess: Adam "
        f"lr {st['lr']} fresh each epoch, cosine decay over the epochs, batch {st['batch_size']}). FedAvg aggregates "
        "every valid update; the geometric median runs with the deployed trust rule.",
        "- The algorithms (fedmed.learning.algorithms), each on the geometric median's robust aggregate (gm-): FedAdam and "
        f"FedYogi at the server (server lr {st.get('server_lr', 0.01)}, beta1 0.9, beta2 0.99, tau 1e-3), FedProx at "
        f"the sites (mu {st.get('proximal_mu', 0.01)}), SCAFFOLD (control variates at the server and the sites)"
        + (
            f"; fedavgm: FedAvg with a server learning rate of {len(sites)} (the number of hospitals, no momentum)."
            if any(n.split("/")[0] == "fedavgm" for n in names)
            else "."
        ),
        *(
            [
                "- An arm named <arm>/k runs k times the rounds, each site training one local epoch over a 1/k share "
                "of its images per round (a fresh share every round, all its images every k rounds): the same "
                "total epochs with shorter local work between aggregations."
            ]
            if any("/" in n for n in names)
            else []
        ),
        f"- Seeds {','.join(map(str, seeds))}: the training seed (model start, shuffling, augmentation); the hospitals "
        f"are the same data (data seed {st['data_seed']}).",
        "",
        "## Result",
        "",
        "| arm | mean AUROC | sd | min | max | vs centralised | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in names:
        m, sd, lo, hi = summary(results[arm])
        per_seed = ", ".join(f"{v:.3f}" for v in results[arm])
        lines.append(f"| {arm} | {m:.3f} | {sd:.3f} | {lo:.3f} | {hi:.3f} | {m - central:+.3f} | {per_seed} |")
    if record.get("reproduced"):
        lines += [
            "",
            f"Run twice, by two of the commands, with the same score to {REPRODUCED:g} (the first run's times kept): "
            + ", ".join(record["reproduced"])
            + ".",
        ]
    lines += ["", f"Targets: federated within {TOLERANCE} AUROC of centralised, and above every hospital alone."]
    for agg in federated:
        m = summary(results[agg])[0]
        near = m >= central - TOLERANCE
        above = m > best_alone
        lines.append(
            f"- {agg}: {m - central:+.3f} vs centralised ({'met' if near else 'missed'}); "
            f"{m - best_alone:+.3f} vs the best hospital alone ({'met' if above else 'missed'})."
        )
    with_finals = all(record["finals"].get(arm) and all(record["finals"][arm]) for arm in names)
    if with_finals:  # a record assembled from cut runs' per-arm lines may lack the per-finding scores
        lines += [
            "",
            "## Where a hospital alone falls short",
            "",
            "Mean AUROC (over seeds) on the findings common at that hospital and on the findings rare there:",
            "",
            "| hospital | findings | alone | centralised | " + " | ".join(federated) + " |",
            "|---|---|---|---|" + "---|" * len(federated),
        ]
    for i, s in enumerate(sites if with_finals else []):
        for j, label in enumerate(("common there", "rare there")):
            row = []
            for arm in (f"{s} alone", CENTRAL, *federated):
                vals = [specialty_split(f, i, len(sites))[j] for f in record["finals"][arm]]
                row.append(f"{np.nanmean(vals):.3f}")
            lines.append(f"| {s} | {label} | " + " | ".join(row) + " |")
    if curves:
        n = max(len(c) for c in curves.values())
        lines += [
            "",
            f"## Learning curves (seed {record['curve_seed']})",
            "",
            "Global test mean AUROC after each epoch:",
            "",
            "| arm | " + " | ".join(str(e + 1) for e in range(n)) + " |",
            "|---|" + "---|" * n,
        ]
        for arm, c in curves.items():
            lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in c) + " |")
    lines += equal_wall_time(record, federated)
    png = out.with_suffix(".png")
    lines += ["", f"![bench_learning]({png.name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    plot(names, results, curves, png)
    tqdm.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
