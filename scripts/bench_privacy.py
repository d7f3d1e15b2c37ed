#!/usr/bin/env python
"""Benchmark: global test AUROC at each privacy level, and DP-SGD vs plain training time per local epoch.

    python scripts/bench_privacy.py [--rounds 3] [--image-size 64] [--out docs/bench_privacy.md]
    python scripts/bench_privacy.py --data data/bench_privacy_large --per-site 1000 --generate-sites 3 \
        --batch-size 128 --levels inf,8 --out docs/bench_privacy_large.md     # hospital-sized sites

Every run uses the same DP-compatible DenseNet-121 (GroupNorm, non-inplace ReLU), with and without DP, so the
numbers compare. Sites: the first 3 synthetic sites of scripts/bench_robustness.py (generated if missing; --per-site
and --generate-sites only apply when the data folder is generated, and 80% of each site is its training split).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "custom"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench_robustness import load_train_sets, make_sites  # noqa: E402
from fedmed.data.loading import load_test  # noqa: E402
from fedmed.inprocess import federate  # noqa: E402
from fedmed.model import build_densenet121  # noqa: E402
from fedmed.privacy.dp_sgd import SitePrivacy  # noqa: E402
from fedmed.privacy.policy import PrivacyPolicy  # noqa: E402
from fedmed.training import train_epochs  # noqa: E402

LEVELS = (("no DP", math.inf), ("weak", 8.0), ("moderate", 3.0), ("strong", 1.0), ("not a preset", 0.1))


def parse_levels(text: str) -> list:
    """'inf,8' -> the LEVELS rows with those epsilon ceilings, in LEVELS order (no DP first: the baseline)."""
    known = {eps: (name, eps) for name, eps in LEVELS}
    wanted = set()
    for part in text.split(","):
        try:
            eps = float(part.strip())
        except ValueError:
            raise ValueError(f"--levels: {part.strip()!r} is not an epsilon (use inf, 8, 3, 1, 0.1)") from None
        if eps not in known:
            raise ValueError(f"--levels: epsilon {part.strip()!r} is not a benchmark level (use inf, 8, 3, 1, 0.1)")
        wanted.add(eps)
    if math.inf not in wanted:
        raise ValueError(f"--levels {text!r} must include inf: the no-DP row is the baseline the others compare to")
    return [level for level in LEVELS if level[1] in wanted]


def epoch_times(train, batch_size: int, lr: float, seed: int) -> tuple[float, float]:
    """Seconds for one local epoch, plain vs DP-SGD, same model architecture, back to back in this process."""
    torch.manual_seed(seed)
    model = build_densenet121(14, norm="group")
    t = time.perf_counter()
    train_epochs(model, train, 1, lr, batch_size, seed)
    plain = time.perf_counter() - t
    site = SitePrivacy(PrivacyPolicy(epsilon=1e6, noise_multiplier=1.0))
    t = time.perf_counter()
    site.train_round(model, train, 1, lr, batch_size, seed, total_epochs=1)
    return plain, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/bench_robustness"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-site", type=int, default=100, help="images per generated site (train + validation)")
    p.add_argument("--generate-sites", type=int, default=5,
                   help="sites to generate when --data is missing (5 = bench_robustness' layout; 3 are used)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of round 1 (cosine decay over rounds)")
    p.add_argument("--levels", default="inf,8,3,1,0.1", help="epsilon ceilings to run, comma-separated; inf = no DP")
    p.add_argument("--skip-epoch-timing", action="store_true",
                   help="do not time one plain and one DP-SGD epoch (saves two epochs on a long run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("docs/bench_privacy.md"))
    a = p.parse_args(argv)
    try:
        levels = parse_levels(a.levels)
    except ValueError as e:
        p.error(str(e))
    if a.generate_sites < 3:
        p.error(f"--generate-sites must be >= 3 (the benchmark federates 3 sites), got {a.generate_sites}")
    torch.set_num_threads(2)
    sites = make_sites(a.data, a.generate_sites, a.per_site, a.seed)[:3]
    if len(sites) < 3:
        p.error(f"--data {a.data} holds {len(sites)} sites; the benchmark needs 3")
    train = load_train_sets(a.data, sites, a.image_size, a.seed)
    test_ds = load_test(a.data / "global_test" / "dicom", a.data / "global_test" / "labels.csv", a.image_size)
    t0 = time.time()
    plain_s, dp_s = (None, None) if a.skip_epoch_timing else epoch_times(train[sites[0]], a.batch_size, a.lr, a.seed)
    rows = []
    for name, eps in tqdm(levels, desc="privacy levels"):
        policy = None if math.isinf(eps) else PrivacyPolicy(epsilon=eps, delta=1e-5, max_grad_norm=1.0)
        try:
            res = federate(train, test_ds, a.rounds, "fedavg", privacy=policy, norm="group", lr=a.lr,
                           batch_size=a.batch_size, seed=a.seed)
        except RuntimeError as e:  # every site refused: the ceiling cannot be certified at this data size
            rows.append((name, eps, None, None, str(e)))
            continue
        rows.append((name, eps, res["auroc"], max(res["epsilon"].values()) if res["epsilon"] else None, ""))
        tqdm.write(f"{name}: AUROC {res['auroc']:.3f} ({time.time() - t0:.0f} s so far)")
    base = rows[0][2]
    options = "" if a.data == Path("data/bench_robustness") else f" --data {a.data}"
    if a.generate_sites != 5:
        options += f" --generate-sites {a.generate_sites}"
    if a.lr != 1e-3:
        options += f" --lr {a.lr:g}"
    if len(levels) != len(LEVELS):
        options += f" --levels {a.levels}"
    if a.skip_epoch_timing:
        options += " --skip-epoch-timing"
    n_train = len(train[sites[0]])
    lines = [
        "# bench_privacy",
        "",
        f"Command: `python scripts/bench_privacy.py --rounds {a.rounds} --per-site {a.per_site} --image-size "
        f"{a.image_size} --batch-size {a.batch_size}{options}` ({time.time() - t0:.0f} s on a 2-core CPU). 3 "
        f"synthetic sites ({', '.join(str(len(train[s])) for s in sites)} training images), DP-SGD at every site "
        f"(delta 1e-5, clip 1.0, noise calibrated to spend the ceiling over the {a.rounds} rounds), FedAvg, "
        f"GroupNorm DenseNet-121 in every row.",
        "",
        "| level | epsilon ceiling | epsilon spent (max site) | global test mean AUROC | vs no DP |",
        "|---|---|---|---|---|",
    ]
    for name, eps, auroc, spent, note in rows:
        if auroc is None:
            lines.append(f"| {name} | {eps} | - | no model: every site refused ({note}) | - |")
            continue
        lines.append(f"| {name} | {'∞' if math.isinf(eps) else eps} | {'-' if spent is None else f'{spent:.3f}'} | "
                     f"{auroc:.3f} | {auroc - base:+.3f} |")
    if plain_s is not None:
        lines += ["", f"One local epoch on {sites[0]} ({n_train} images, batch {a.batch_size}, "
                  f"{a.image_size} px): plain {plain_s:.1f} s, DP-SGD {dp_s:.1f} s, ratio {dp_s / plain_s:.2f}x."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
