"""Pretrain DenseNet-121 on a public labelled dataset, outside the federation, to give the job a starting model.

    python scripts/pretrain_public.py --format chestxray14 --root /data/ChestX-ray14 --out weights/cxr_public.pt
    python scripts/pretrain_public.py --format dicom --root data/public/dicom --labels-csv data/public/labels.csv \
        --out weights/cxr_public.pt --norm group --image-size 128 --epochs 5

Then: `python jobs/cxr_densenet/job.py ... --initial-weights weights/cxr_public.pt`. Differentially private
training from scratch loses most of its signal to the noise; starting from public features and DP-training only the
top of the network (`--dp-train-layers`) is what keeps a DP model close to a non-DP one (docs/bench_privacy.md).
Only public data belongs here: nothing this script sees is protected by DP. Nothing is downloaded; --root must
already hold the data (the NIH ChestX-ray14 release: Data_Entry_2017.csv, train_val_list.txt and the PNG folders).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fedmed.data.loading import load_items, load_train_val
from fedmed.job.tasks import CHEST_XRAY14, TASKS, get_task
from fedmed.learning.training import LocalTraining, evaluate, round_lr, train_epochs
from fedmed.models.model_card import META_MODEL_CARD, ModelCard, data_is_synthetic
from fedmed.models.network import NORMS, build_densenet121, state_to_numpy
from fedmed.models.weights import save_state
from fedmed.site.site_config import DataConfig


def pretraining_card(task: str, source: str, synthetic, rounds: int = 1) -> ModelCard:
    """The model card of centrally pretrained weights: one data source, no DP, no HE."""
    return ModelCard(
        task=task,
        hospitals=(source,),
        rounds=rounds,
        synthetic_sites=(source,) if synthetic is True else (),
        real_sites=(source,) if synthetic is False else (),
        unknown_sites=(source,) if synthetic is None else (),
        dp_epsilon={source: None},
        trained_by="central pretraining (fedmed-pretrain-public)",
        aggregation="none (one site)",
    )


@dataclass(frozen=True)
class Pretraining:
    """How central pretraining trains: epochs, input size, batch, Adam's first learning rate (cosine-decayed over
    the epochs), DenseNet-121 normalisation ('group' for federations with DP-SGD sites) and seed."""

    epochs: int = 5
    image_size: int = 128
    batch_size: int = 32
    lr: float = 1e-3
    norm: str = "group"
    seed: int = 0


def pretrain(
    data: DataConfig, out: Path, task_name: str, settings: Pretraining = Pretraining(), progress: bool = True
) -> dict:
    """Train on `data` (its train split), keep the epoch with the best validation score, save it to `out` with
    what it was trained on in the file's meta. Returns that meta."""
    task = get_task(task_name)
    train, val = load_train_val(data, settings.image_size, settings.seed, task)
    params, meta = pretrain_on(train, val, task, settings, progress)
    meta.update(pretrained_on=str(data.root), format=data.format, image_size=settings.image_size)
    meta[META_MODEL_CARD] = pretraining_card(
        task.name, Path(data.root).name, data_is_synthetic([it.path for it in load_items(data, task)])
    ).to_meta()
    save_state(params, out, meta)  # atomic: an interrupted run never leaves a half-written weights file
    return meta


def pretrain_on(train, val, task, settings: Pretraining, progress: bool = True) -> tuple[dict, dict]:
    """The training behind pretrain(), on datasets already loaded (the benchmarks pool several synthetic public
    sites): returns (parameters of the best validation epoch, meta). settings.image_size is the loaded data's."""
    epochs, batch_size, lr, norm, seed = settings.epochs, settings.batch_size, settings.lr, settings.norm, settings.seed
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{len(train)} training and {len(val)} validation images; both must be > 0")
    torch.manual_seed(seed)
    model = build_densenet121(task.num_outputs, norm=norm)
    best, best_score, history = None, -1.0, []
    bar = tqdm(range(epochs), desc="pretraining", unit="epoch", disable=not progress)
    t0 = time.perf_counter()
    for epoch in bar:
        # cosine decay over the epochs, as over FL rounds: the last epochs refine rather than jump around
        loss = train_epochs(
            model, train, LocalTraining(1, round_lr(lr, epoch, epochs), batch_size, seed=seed + epoch), task=task
        )
        val_result = evaluate(model, val, task)
        history.append({"epoch": epoch + 1, "train_loss": loss, task.score_name: val_result.score})
        bar.set_postfix(loss=f"{loss:.4f}", **{task.score_name: f"{val_result.score:.3f}"})
        if val_result.score > best_score:
            best, best_score = state_to_numpy(model), val_result.score
    meta = {
        "task": task.name,
        "norm": norm,
        "epochs": epochs,
        "train_images": len(train),
        "val_images": len(val),
        "best_val_score": best_score,
        "score_name": task.score_name,
        "seconds": time.perf_counter() - t0,
        "history": history,
    }
    return best, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=("chestxray14", "dicom", "csv_manifest"), required=True)
    p.add_argument("--root", type=Path, required=True, help="ChestX-ray14 folder, DICOM tree, or manifest CSV")
    p.add_argument("--labels-csv", type=Path, help="DICOM only: labels keyed by SOPInstanceUID")
    p.add_argument("--task", choices=sorted(TASKS), default=CHEST_XRAY14.name, help="default chest_xray14")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.pt)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--image-size", type=int, default=128, help="must equal the job's --image-size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--norm",
        choices=NORMS,
        default="group",
        help="must equal the job's --norm ('group' for federations with DP-SGD sites)",
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not a.root.exists():
        p.error(f"--root {a.root}: no such file or folder")
    if a.format == "dicom" and a.labels_csv is None:
        p.error("--format dicom needs --labels-csv")
    if a.out.exists():
        p.error(f"--out {a.out} already exists; choose another name (existing weights are never overwritten)")
    try:
        meta = pretrain(
            DataConfig(a.format, a.root, a.labels_csv),
            a.out,
            a.task,
            Pretraining(a.epochs, a.image_size, a.batch_size, a.lr, a.norm, a.seed),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {a.out}: best validation {meta['score_name']} {meta['best_val_score']:.3f} over {a.epochs} epochs "
        f"on {meta['train_images']} images ({meta['seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
