"""Turn a site's DataConfig into train/validation datasets, whatever the on-disk format."""

from __future__ import annotations

from pathlib import Path

from fedmed.data.dataset import RadiographDataset
from fedmed.data.labels import LabelledImage, load_chestxray14, load_csv_manifest, load_dicom_site
from fedmed.data.splitting import train_val_split
from fedmed.site.site_config import DataConfig
from fedmed.job.tasks import CHEST_XRAY14, TaskSpec


def load_items(data: DataConfig, task: TaskSpec) -> list[LabelledImage]:
    if data.format == "dicom":
        return load_dicom_site(data.root, data.labels_csv, task=task)
    if data.format == "chestxray14":
        if task != CHEST_XRAY14:
            raise ValueError(f"data format 'chestxray14' holds chest X-ray findings; it cannot serve task {task.name!r}")
        return load_chestxray14(data.root)
    if data.format == "csv_manifest":
        return load_csv_manifest(data.root, task)
    raise ValueError(f"unknown data format {data.format!r}")


def split_items(items: list[LabelledImage], val_fraction: float, seed: int) -> tuple[list, list]:
    """Use the labels' own train/val split when they carry one, else a seeded random split."""
    train = [it for it in items if it.split == "train"]
    val = [it for it in items if it.split == "val"]
    if train and val:
        return train, val
    tr_idx, va_idx = train_val_split(len(items), val_fraction, seed)
    return [items[i] for i in tr_idx], [items[i] for i in va_idx]


def load_train_val(data: DataConfig, image_size: int, seed: int,
                   task: TaskSpec) -> tuple[RadiographDataset, RadiographDataset]:
    train, val = split_items(load_items(data, task), data.val_fraction, seed)
    return (RadiographDataset(train, image_size, train=True, seed=seed, modalities=task.modalities),
            RadiographDataset(val, image_size, train=False, modalities=task.modalities))


def load_test(dicom_root: Path, labels_csv: Path, image_size: int, task: TaskSpec) -> RadiographDataset:
    """The global test set: every labelled image under the folder, whatever its split column says."""
    return RadiographDataset(load_dicom_site(Path(dicom_root), Path(labels_csv), task=task), image_size, train=False,
                             modalities=task.modalities)
