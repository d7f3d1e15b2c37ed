"""Synthetic benchmark sites shared by the benchmarks (bench_privacy; scripts/bench_robustness.py keeps its own
copy until its rewrite lands): site-0..site-(n-1) plus a global test set, and their training splits."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from fedmed.data.loading import load_train_val
from fedmed.data.synthetic import DEFAULT_HOSPITALS, HospitalSpec, generate_hospitals
from fedmed.job.tasks import CHEST_XRAY14
from fedmed.paths import RUNS
from fedmed.site.site_config import DataConfig


def make_sites(root: Path, n_sites: int, per_site: int, seed: int, num_test: int = 200) -> list[str]:
    """Synthetic sites site-0..site-(n-1) plus a num_test-image global test set, generated once into root."""
    if (root / "global_test" / "labels.csv").exists():
        return sorted(p.name for p in root.iterdir() if p.name.startswith("site-"))
    specs = [HospitalSpec(f"site-{i}", per_site, DEFAULT_HOSPITALS[i % 3].scanner) for i in range(n_sites)]
    generate_hospitals(root, specs, num_test=num_test, seed=seed, size=128)
    return [s.name for s in specs]


def load_train_sets(root: Path, sites: list, image_size: int, seed: int) -> dict:
    """Each site's training split, decoded once (the benchmarks do not use the validation split)."""
    return {
        s: load_train_val(
            DataConfig("dicom", root / s / "dicom", root / s / "labels.csv"), image_size, seed, CHEST_XRAY14
        )[0]
        for s in tqdm(sites, desc="loading sites")
    }


def measure_training(images: int, image_size: int, seed: int) -> tuple[float, dict, dict]:
    """One real local epoch (Adam, batch 16) on a synthetic hospital; returns (seconds, start params, trained)."""
    import time
    from dataclasses import replace

    import torch

    from fedmed.learning.training import LocalTraining, train_epochs
    from fedmed.models.network import build_densenet121, state_to_numpy
    from fedmed.site.site_config import DataConfig

    root = RUNS / "bench_he" / f"site_{images}"
    spec = replace(DEFAULT_HOSPITALS[0], num_images=images)
    if not (root / spec.name / "labels.csv").exists():
        generate_hospitals(root, [spec], num_test=8, seed=seed, size=max(image_size, 128))
    train, _ = load_train_val(
        DataConfig("dicom", root / spec.name / "dicom", root / spec.name / "labels.csv"), image_size, seed, CHEST_XRAY14
    )
    torch.manual_seed(seed)
    model = build_densenet121(14)
    start = state_to_numpy(model)
    t0 = time.perf_counter()
    train_epochs(model, train, LocalTraining(1, 1e-3, 16, seed=seed), task=CHEST_XRAY14)
    return time.perf_counter() - t0, start, state_to_numpy(model)
