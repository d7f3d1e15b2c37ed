"""A site's pre-flight check: its data paths exist, its labels open, and one labelled image reads.

Run by `install.sh --check` (fedmed-install-kit --check) and when a hospital's site starts
(fedmed.flare.site_start.SiteStartCheck), so a wrong path shows before any job instead of in a job's error log.
Cheap on purpose: the labels file is parsed, but only one image is read (not the whole tree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmed.data.dataset import read_image
from fedmed.data.dicom import UnusableDicomError, iter_dicom_files, read_header
from fedmed.data.labels import read_site_label_csv
from fedmed.data.loading import load_items
from fedmed.site.site_config import SiteConfig
from fedmed.job.tasks import TASKS, TaskSpec


@dataclass(frozen=True)
class PreflightResult:
    task: str  # the first task (fedmed.job.tasks.TASKS) whose labels this site's file carries
    labelled: int  # rows in the labels file (DICOM) or labelled images (other formats)
    image: Path  # the image that was read
    shape: tuple


def _first_labelled_dicom(root: Path, table: dict, task: TaskSpec) -> Path:
    """The first DICOM file under root that has a label row and a modality the task accepts."""
    seen = 0
    for path in iter_dicom_files(root):
        seen += 1
        try:
            header = read_header(path)
        except UnusableDicomError:
            continue
        if (header.sop_instance_uid in table or header.study_instance_uid in table) \
                and header.modality in task.modalities:
            return path
    if seen == 0:
        raise FileNotFoundError(f"data.root {root} holds no files")
    raise ValueError(f"none of the {seen} file(s) under data.root {root} is a readable {task.modalities} DICOM "
                     "image with a row in data.labels_csv (wrong folder, or labels of another site?)")


def _check_task(cfg: SiteConfig, task: TaskSpec) -> PreflightResult:
    data = cfg.data
    if data.format == "dicom":
        table = read_site_label_csv(data.labels_csv, task)  # raises naming the file and the missing column
        if not table:
            raise ValueError(f"data.labels_csv {data.labels_csv} has no label rows")
        path = _first_labelled_dicom(data.root, table, task)
        count = len(table)
    else:
        items = load_items(data, task)
        if not items:
            raise ValueError(f"data.root {data.root} lists no labelled images")
        path, count = items[0].path, len(items)
    image = read_image(path, task.modalities)
    return PreflightResult(task.name, count, Path(path), tuple(image.shape))


def check_site_data(cfg: SiteConfig) -> PreflightResult:
    """Raises (FileNotFoundError / ValueError naming the key and the path) unless the site's labels open for one of
    fedmed's tasks and one labelled image of it reads. The site does not know which task a job will bring, so the
    tasks are tried in order and the first that fits is reported."""
    data = cfg.data
    for key, path in (("data.root", data.root), ("data.labels_csv", data.labels_csv)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{key} {path} does not exist (set in {cfg.source})")
    errors = []
    for task in TASKS.values():
        try:
            return _check_task(cfg, task)
        except (ValueError, KeyError, OSError) as e:
            errors.append(f"{task.name}: {e}")
    raise ValueError(f"{cfg.source}: the site's data does not fit any task: " + "; ".join(errors))
