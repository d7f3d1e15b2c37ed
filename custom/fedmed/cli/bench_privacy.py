"""Benchmark: global test AUROC at each privacy level, and DP-SGD vs plain training time per local epoch.

    python scripts/bench_privacy.py                   # the recommended DP setup -> docs/bench_privacy.md
    python scripts/bench_privacy.py --from-scratch --dp-train-layers all --levels inf,8 \
        --out docs/bench_privacy_scratch.md           # DP-SGD on all 7M weights of a fresh model, for comparison

Setup: 3 synthetic hospitals (--per-site images each, 80% training), FedAvg, --rounds rounds of one local epoch,
GroupNorm DenseNet-121 (non-inplace ReLU) in every row, with and without DP, so the numbers compare. Unless
--from-scratch, the global model starts from a DenseNet-121 pretrained without DP on a separate synthetic "public"
set (other seed, --public-images images), as a consortium would start from a model trained on public ChestX-ray14;
DP sites then train only --dp-train-layers. Rows: the starting model itself, no DP training every layer (the
baseline), no DP training only the DP layers, then each epsilon ceiling (delta 1e-5, clip 1.0, noise calibrated to
spend the ceiling by the last round). Then one local epoch of plain training and of DP-SGD at each --timing-points
(image size x batch), back to back, since Opacus' overhead depends on both.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Subset
from tqdm import tqdm

from fedmed.cli.bench_sites import load_train_sets, make_sites
from fedmed.cli.pretrain_public import Pretraining, pretrain_on, pretraining_card
from fedmed.data.loading import load_test, load_train_val
from fedmed.data.synthetic import HospitalSpec, ScannerProfile, generate_hospitals
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.learning.training import LocalTraining, evaluate, train_epochs
from fedmed.models.model_card import META_MODEL_CARD
from fedmed.models.network import build_densenet121, load_numpy_state, set_trainable
from fedmed.models.weights import save_state
from fedmed.privacy.dp_sgd import SitePrivacy
from fedmed.privacy.policy import PrivacyPolicy
from fedmed.sim.inprocess import FederationPlan, federate
from fedmed.site.site_config import DataConfig

LEVELS = (("no DP", math.inf), ("weak", 8.0), ("moderate", 3.0), ("strong", 1.0), ("not a preset", 0.1))
DEFAULT_DP_LAYERS = "features.denseblock4.,features.norm5.,class_layers."
# The public set's scanners: none of them is a benchmark hospital's (those are DEFAULT_HOSPITALS'), as public data
# comes from other hospitals' machines.
PUBLIC_SCANNERS = (
    ScannerProfile("CR", "MONOCHROME2", 1.1, 0.95, 0.018, 1.5, 1.0, 0.0, 0.7),
    ScannerProfile("DX", "MONOCHROME1", 0.9, 1.05, 0.014, 1.3, 1.0, 0.0, 0.55),
    ScannerProfile("DX", "MONOCHROME2", 1.2, 1.0, 0.02, 1.4, 1.0, -1024.0, 0.9),
)


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


def parse_layers(text: str):
    """'all' -> None (every parameter), else the comma-separated prefixes."""
    if text.strip() == "all":
        return None
    layers = [x.strip() for x in text.split(",") if x.strip()]
    if not layers:
        raise ValueError("--dp-train-layers is empty (use 'all' or parameter-name prefixes)")
    return layers


def public_model(root: Path, n_images: int, epochs: int, image_size: int, seed: int) -> tuple[dict, dict]:
    """A DenseNet-121 pretrained without DP on a synthetic public set (3 scanners none of the hospitals has, another
    seed than the hospitals'), generated and trained once, then cached beside it."""
    weights = root / f"public_densenet121_{n_images}img_{image_size}px_{epochs}ep_seed{seed}.pt"
    if not weights.is_file():
        public = root / f"public_{n_images}img"
        names = [f"public-{i}" for i in range(3)]
        if not (public / "global_test" / "labels.csv").exists():
            specs = [HospitalSpec(n, n_images // 3, scanner) for n, scanner in zip(names, PUBLIC_SCANNERS)]
            generate_hospitals(public, specs, num_test=20, seed=seed + 1, size=128)
        splits = [
            load_train_val(
                DataConfig("dicom", public / n / "dicom", public / n / "labels.csv"), image_size, seed, CHEST_XRAY14
            )
            for n in names
        ]
        params, meta = pretrain_on(
            ConcatDataset([s[0] for s in splits]),
            ConcatDataset([s[1] for s in splits]),
            CHEST_XRAY14,
            Pretraining(epochs, image_size, 64, 1e-3, "group", seed),
        )
        meta.update(pretrained_on=str(public), format="dicom", image_size=image_size)
        meta[META_MODEL_CARD] = pretraining_card(CHEST_XRAY14.name, public.name, True).to_meta()  # generated above
        save_state(params, weights, meta)
    blob = torch.load(weights, weights_only=True)
    return {k: v.numpy() for k, v in blob["state_dict"].items()}, blob["meta"]


def parse_timing_points(text: str) -> list:
    """'32x128,128x16' -> [(32, 128), (128, 16)]: (image size, batch size) pairs to time an epoch at."""
    points = []
    for part in text.split(","):
        try:
            size, batch = (int(v) for v in part.strip().split("x"))
        except ValueError:
            raise ValueError(f"--timing-points: {part.strip()!r} is not SIZExBATCH (e.g. 128x16)") from None
        if size < 32 or batch < 1:
            raise ValueError(f"--timing-points: {part.strip()!r} needs an image size >= 32 and a batch >= 1")
        points.append((size, batch))
    return points


def epoch_times(train, batch_size: int, lr: float, seed: int, layers) -> dict:
    """Seconds for one local epoch, back to back in this process: plain and DP-SGD on every layer (same model),
    and DP-SGD on `layers` only. Measured together so the ratios share the machine's state."""
    out = {}
    for label, dp, trainable in (("plain", False, None), ("dp", True, None), ("dp_layers", True, layers)):
        if label == "dp_layers" and layers is None:
            continue
        torch.manual_seed(seed)
        model = build_densenet121(14, norm="group")
        t = time.perf_counter()
        if dp:
            SitePrivacy(PrivacyPolicy(epsilon=1e6, noise_multiplier=1.0)).train_round(
                model, train, LocalTraining(1, lr, batch_size, trainable=trainable, total_epochs=1), task=CHEST_XRAY14
            )
        else:
            train_epochs(model, train, LocalTraining(1, lr, batch_size, seed=seed), task=CHEST_XRAY14)
        out[label] = time.perf_counter() - t
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/bench_privacy"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-site", type=int, default=1000, help="images per generated hospital (train + validation)")
    p.add_argument(
        "--num-test",
        type=int,
        default=1000,
        help="global test images (AUROC differences of 0.01 need a test set this large to mean much)",
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of round 1 (cosine decay over rounds)")
    p.add_argument("--levels", default="inf,8,3,1,0.1", help="epsilon ceilings to run, comma-separated; inf = no DP")
    p.add_argument(
        "--dp-train-layers",
        default=DEFAULT_DP_LAYERS,
        help="parameter-name prefixes DP sites train, comma-separated, or 'all'",
    )
    p.add_argument("--from-scratch", action="store_true", help="start from a fresh model, not the public one")
    p.add_argument("--public-images", type=int, default=3000, help="size of the synthetic public pretraining set")
    p.add_argument("--public-epochs", type=int, default=6)
    p.add_argument(
        "--timing-points",
        default="32x128,128x16",
        help="IMAGE_SIZExBATCH pairs at which to time plain vs DP-SGD epochs: Opacus' per-sample gradients "
        "cost the same per image at any resolution, so the ratio depends on both",
    )
    p.add_argument("--timing-images", type=int, default=400, help="site-0 training images timed per epoch")
    p.add_argument(
        "--skip-epoch-timing",
        action="store_true",
        help="do not time plain and DP-SGD epochs (saves three epochs per timing point)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1 on a CPU shared with other jobs: 2 OpenMP threads per process there thrash)",
    )
    p.add_argument("--out", type=Path, default=Path("docs/bench_privacy.md"))
    a = p.parse_args(argv)
    try:
        levels = parse_levels(a.levels)
        layers = parse_layers(a.dp_train_layers)
        timing_points = parse_timing_points(a.timing_points)
    except ValueError as e:
        p.error(str(e))
    if a.per_site < 10 or a.public_images < 30 or a.num_test < 10 or a.timing_images < 1:
        p.error("--per-site and --num-test must be >= 10, --public-images >= 30, --timing-images >= 1")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    sites = make_sites(a.data, 3, a.per_site, a.seed, a.num_test)[:3]
    if len(sites) < 3:
        p.error(f"--data {a.data} holds {len(sites)} sites; the benchmark needs 3")
    train = load_train_sets(a.data, sites, a.image_size, a.seed)
    test_ds = load_test(
        a.data / "global_test" / "dicom", a.data / "global_test" / "labels.csv", a.image_size, CHEST_XRAY14
    )
    initial, start_note = None, "a fresh DenseNet-121 (seed 0)"
    rows = []
    if not a.from_scratch:
        initial, meta = public_model(a.data, a.public_images, a.public_epochs, a.image_size, a.seed)
        model = build_densenet121(14, norm="group")
        load_numpy_state(model, initial)
        rows.append(
            (
                "public model, before any federated round",
                None,
                "-",
                evaluate(model, test_ds, CHEST_XRAY14).mean_auroc,
                None,
            )
        )
        start_note = (
            f"DenseNet-121 pretrained without DP on a synthetic public set ({meta['train_images']} training "
            f"images, {meta['epochs']} epochs, best public-validation AUROC {meta['best_val_score']:.3f}, "
            f"{meta['seconds']:.0f} s)"
        )
    model = build_densenet121(14, norm="group")
    trained_names = set(set_trainable(model, layers))
    n_layers = sum(p.numel() for n, p in model.named_parameters() if n in trained_names)
    n_all = sum(p.numel() for p in model.parameters())
    timing = {}
    for size, batch in [] if a.skip_epoch_timing else tqdm(timing_points, desc="epoch timing"):
        site_train = (
            train[sites[0]] if size == a.image_size else load_train_sets(a.data, sites[:1], size, a.seed)[sites[0]]
        )
        subset = Subset(site_train, range(min(a.timing_images, len(site_train))))
        timing[(size, batch)] = (len(subset), epoch_times(subset, batch, a.lr, a.seed, layers))
    plan = [(name, eps, None) for name, eps in levels if math.isinf(eps)]
    if layers is not None and any(math.isinf(eps) for _, eps in levels):
        plan.append(("no DP, DP's layers only", math.inf, layers))
    plan += [(name, eps, layers) for name, eps in levels if not math.isinf(eps)]
    for name, eps, trainable in tqdm(plan, desc="privacy levels"):
        policy = None if math.isinf(eps) else PrivacyPolicy(epsilon=eps, delta=1e-5, max_grad_norm=1.0)
        try:
            res = federate(
                train,
                test_ds,
                FederationPlan(
                    task=CHEST_XRAY14,
                    rounds=a.rounds,
                    aggregation="fedavg",
                    privacy=policy,
                    norm="group",
                    lr=a.lr,
                    batch_size=a.batch_size,
                    seed=a.seed,
                    trainable=trainable,
                ),
                initial_params=initial,
            )
        except RuntimeError as e:  # every site refused: the ceiling cannot be certified at this data size
            rows.append((name, eps, "-", None, str(e)))
            continue
        spent = max(res["epsilon"].values()) if res["epsilon"] else None
        rows.append((name, eps, "all" if trainable is None else ",".join(trainable), res["auroc"], spent))
        tqdm.write(f"{name}: AUROC {res['auroc']:.3f} ({time.time() - t0:.0f} s so far)")
    base = next(r[3] for r in rows if r[0] == "no DP")
    # The command line that reproduces this run: every option that differs from its default.
    options = ""
    for flag in (
        "--data",
        "--rounds",
        "--per-site",
        "--num-test",
        "--image-size",
        "--batch-size",
        "--lr",
        "--levels",
        "--dp-train-layers",
        "--public-images",
        "--public-epochs",
        "--seed",
        "--threads",
        "--out",
        "--timing-points",
        "--timing-images",
    ):
        dest = flag[2:].replace("-", "_")
        if getattr(a, dest) != p.get_default(dest) and not (a.skip_epoch_timing and dest.startswith("timing_")):
            options += f" {flag} {getattr(a, dest)}"
    options += " --from-scratch" * a.from_scratch + " --skip-epoch-timing" * a.skip_epoch_timing
    lines = [
        "# bench_privacy",
        "",
        f"Command: `python scripts/bench_privacy.py{options}` ({time.time() - t0:.0f} s on a 2-core CPU, including "
        f"data generation and pretraining when not cached). 3 synthetic hospitals "
        f"({', '.join(str(len(train[s])) for s in sites)} training images, {a.image_size} px), a global test set of "
        f"{len(test_ds)} images, FedAvg, {a.rounds} "
        f"rounds of one local epoch, batch {a.batch_size}, Adam lr {a.lr:g} with cosine decay; GroupNorm DenseNet-121 "
        f"in every row. Start: {start_note}. DP rows: Opacus DP-SGD at every site, delta 1e-5, clip 1.0, noise "
        f"calibrated to spend the ceiling by the last round, training "
        f"{'every layer' if layers is None else ', '.join(layers)} ({n_layers:,} of {n_all:,} weights).",
        "",
        "| row | epsilon ceiling | layers trained | epsilon spent (max site) | global test mean AUROC | vs no DP |",
        "|---|---|---|---|---|---|",
    ]
    for name, eps, trained, auroc, spent in rows:
        eps_text = "-" if eps is None else ("∞" if math.isinf(eps) else f"{eps:g}")
        if auroc is None:
            lines.append(f"| {name} | {eps_text} | {trained} | - | no model: every site refused ({spent}) | - |")
            continue
        spent_text = "-" if not isinstance(spent, float) else f"{spent:.3f}"
        lines.append(f"| {name} | {eps_text} | {trained} | {spent_text} | {auroc:.3f} | {auroc - base:+.3f} |")
    if timing:
        lines += [
            "",
            f"Time for one local epoch on {sites[0]}'s first training images (fresh model, measured back to back "
            "in this run; the target is DP-SGD <= 2x plain):",
            "",
            "| image size | batch | images | plain, every layer | DP-SGD, every layer | ratio | "
            "DP-SGD, DP layers only | ratio to plain every layer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (size, batch), (n_images, t) in timing.items():
            layers_cells = (
                f"{t['dp_layers']:.1f} s | **{t['dp_layers'] / t['plain']:.2f}x**" if "dp_layers" in t else "- | -"
            )
            lines.append(
                f"| {size} px | {batch} | {n_images} | {t['plain']:.1f} s | {t['dp']:.1f} s | "
                f"**{t['dp'] / t['plain']:.2f}x** | {layers_cells} |"
            )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
