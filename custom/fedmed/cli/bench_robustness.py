"""Benchmark: final global test AUROC of each aggregator with and without hostile hospitals.

    python scripts/bench_robustness.py [--rounds 3] [--image-size 64] [--out docs/bench_robustness.md]

Runs the federated rounds in-process through the round engine the NVFlare Controller calls (fedmed.server.rounds, via
fedmed.sim.inprocess; sites train as the Executor does), so it measures the aggregators, not the transport. Scenarios:
clean 3 sites, 1-of-3 hostile, 2-of-5 hostile, and the honest sites alone as the reference for each hostile case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fedmed.cli.bench_sites import load_train_sets, make_sites
from fedmed.data.loading import load_test
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.sim.attacks import Attack
from fedmed.sim.inprocess import Adversary, FederationPlan, federate

AGGREGATIONS = ("fedavg", "geometric_median", "coordinate_median", "trimmed_mean")


def plot(results: dict, honest: dict, scenarios: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (len(AGGREGATIONS) + 1)
    for j, agg in enumerate(AGGREGATIONS):
        ax.bar(
            [i + j * width for i in range(len(scenarios))], [results[(sc, agg)] for sc in scenarios], width, label=agg
        )
    ax.bar(
        [i + len(AGGREGATIONS) * width for i in range(len(scenarios))],
        [honest.get(sc, 0) for sc in scenarios],
        width,
        label="honest sites alone",
        color="grey",
    )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(scenarios))], scenarios)
    ax.set_ylim(0.3, 1.0)
    ax.axhline(0.5, color="k", lw=0.5, ls=":")
    ax.set_ylabel("final global test mean AUROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/bench_robustness"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-site", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--attack", default="sign_flip", help="sign_flip, scale, gaussian_noise, label_flip, little_is_enough"
    )
    p.add_argument("--factor", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: two processes with 2 OpenMP threads each on 2 cores can run 100x slower)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/bench_robustness.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sites = make_sites(a.data, 5, a.per_site, a.seed)
    datasets = load_train_sets(a.data, sites, a.image_size, a.seed)
    test_ds = load_test(
        a.data / "global_test" / "dicom", a.data / "global_test" / "labels.csv", a.image_size, CHEST_XRAY14
    )
    attack = Attack(a.attack, a.factor, a.seed)
    scenarios = {
        "clean, 3 sites": (sites[:3], {}),
        "1 of 3 hostile": (sites[:3], {sites[2]: attack}),
        "2 of 5 hostile": (sites[:5], {sites[3]: attack, sites[4]: attack}),
    }
    references = {"1 of 3 hostile": sites[:2], "2 of 5 hostile": sites[:3]}
    results, t0 = {}, time.time()
    cells = [(sc, agg) for sc in scenarios for agg in AGGREGATIONS]
    for sc, agg in tqdm(cells, desc="cells"):
        names, hostile = scenarios[sc]
        plan = FederationPlan(
            task=CHEST_XRAY14, rounds=a.rounds, aggregation=agg, seed=a.seed, use_trust=agg == "geometric_median"
        )
        results[(sc, agg)] = federate({n: datasets[n] for n in names}, test_ds, plan, Adversary(hostile))["auroc"]
        tqdm.write(f"{sc}, {agg}: AUROC {results[(sc, agg)]:.3f} ({time.time() - t0:.0f} s so far)")  # a cut run
    honest = {
        sc: federate(
            {n: datasets[n] for n in names},
            test_ds,
            FederationPlan(task=CHEST_XRAY14, rounds=a.rounds, aggregation="geometric_median", seed=a.seed),
        )["auroc"]
        for sc, names in tqdm(references.items(), desc="honest-only references")
    }
    lines = [
        "# bench_robustness",
        "",
        f"Command: `python scripts/bench_robustness.py --rounds {a.rounds} --per-site {a.per_site} --image-size "
        f"{a.image_size} --attack {a.attack} --factor {a.factor}` ({time.time() - t0:.0f} s on a 2-core CPU).",
        f"Hostile sites send `{a.attack}` x{a.factor}. Geometric median runs with trust scoring and quarantine; the "
        "baselines aggregate every update that passes screening (no trust rule). Cells: final global test mean AUROC "
        "(200 images).",
        "",
        "| scenario | " + " | ".join(AGGREGATIONS) + " | honest sites alone (geometric median) |",
        "|---|" + "---|" * (len(AGGREGATIONS) + 1),
    ]
    for sc in scenarios:
        ref = f"{honest[sc]:.3f}" if sc in honest else "-"
        lines.append(f"| {sc} | " + " | ".join(f"{results[(sc, g)]:.3f}" for g in AGGREGATIONS) + f" | {ref} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    plot(results, honest, list(scenarios), a.out.with_suffix(".png"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
