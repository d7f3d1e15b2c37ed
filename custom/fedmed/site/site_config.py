"""A hospital's own settings (one JSON file under site_configs/<site>/), parsed into a frozen, validated object.

Relative paths in the file are resolved against the file's folder, so a site folder can be moved as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fedmed.job.config_keys import check_keys
from fedmed.privacy.policy import PrivacyPolicy, parse_privacy
from fedmed.sim.attacks import Attack, parse_attack

DATA_FORMATS = ("dicom", "chestxray14", "csv_manifest")
TOP_KEYS = (
    "site_name",
    "data",
    "resources",
    "hostile",
    "privacy",
    "privacy_ledger",
    "synthetic_rehearsal",
    "share_local_model",
)
DATA_KEYS = ("format", "root", "labels_csv", "val_fraction")
RESOURCES_KEYS = ("num_threads",)


@dataclass(frozen=True)
class DataConfig:
    format: str
    root: Path  # DICOM tree, ChestX-ray14 folder, or manifest CSV
    labels_csv: Optional[Path] = None  # DICOM only: labels keyed by SOPInstanceUID
    val_fraction: float = 0.2  # used when the labels carry no train/val split


@dataclass(frozen=True)
class SiteConfig:
    site_name: str
    data: DataConfig
    num_threads: Optional[int] = None
    hostile: Optional[Attack] = None  # rehearsal only: makes this site send hostile updates
    privacy: Optional[PrivacyPolicy] = None  # DP-SGD with this ceiling; None = no DP at this site
    source: Optional[Path] = None
    # The site's lifetime privacy ledger; None = <kit>/local/privacy_ledger.jsonl. Only ever from this file.
    privacy_ledger: Optional[Path] = None
    # The data is synthetic (generated for a rehearsal): the only case in which a deployed site may run without a
    # privacy policy. A real hospital's file never sets it.
    synthetic_rehearsal: bool = False
    # Cross-site evaluation: lend this hospital's last local model to be scored at the other hospitals (fedmed.server.crosssite
    # says when it still does not: HE on, or privacy from an update-noise filter). Off unless the site turns it on.
    share_local_model: bool = False


def _path(value, base: Path, key: str, source: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{source}: '{key}' must be a non-empty path string, got {value!r}")
    p = Path(os.path.expandvars(os.path.expanduser(value)))
    return p if p.is_absolute() else (base / p).resolve()


def parse_site_config(raw: dict, source: Path) -> SiteConfig:
    base = Path(source).resolve().parent
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: top level must be a JSON object")
    check_keys(raw, TOP_KEYS, str(source))  # first: a misspelt key is the likeliest cause of what follows
    name = raw.get("site_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: 'site_name' must be a non-empty string, got {name!r}")
    data = raw.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{source}: 'data' must be an object with 'format' and 'root'")
    check_keys(data, DATA_KEYS, f"{source}: data")
    fmt = data.get("format")
    if fmt not in DATA_FORMATS:
        raise ValueError(f"{source}: data.format must be one of {DATA_FORMATS}, got {fmt!r}")
    labels = data.get("labels_csv")
    if fmt == "dicom" and not labels:
        raise ValueError(f"{source}: data.labels_csv is required for format 'dicom'")
    val_fraction = data.get("val_fraction", 0.2)
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"{source}: data.val_fraction must be in (0, 1), got {val_fraction!r}")
    resources = raw.get("resources", {})
    if not isinstance(resources, dict):
        raise ValueError(f"{source}: 'resources' must be an object, got {resources!r}")
    check_keys(resources, RESOURCES_KEYS, f"{source}: resources")
    threads = resources.get("num_threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{source}: resources.num_threads must be a positive integer, got {threads!r}")
    synthetic = raw.get("synthetic_rehearsal", False)
    if not isinstance(synthetic, bool):
        raise ValueError(f"{source}: synthetic_rehearsal must be true or false, got {synthetic!r}")
    share = raw.get("share_local_model", False)
    if not isinstance(share, bool):
        raise ValueError(f"{source}: share_local_model must be true or false, got {share!r}")
    ledger = raw.get("privacy_ledger")
    try:
        hostile = parse_attack(raw.get("hostile"))
        privacy = parse_privacy(raw.get("privacy"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    return SiteConfig(
        site_name=name,
        data=DataConfig(
            fmt,
            _path(data.get("root"), base, "data.root", source),
            _path(labels, base, "data.labels_csv", source) if labels else None,
            float(val_fraction),
        ),
        num_threads=threads,
        hostile=hostile,
        privacy=privacy,
        source=Path(source),
        privacy_ledger=_path(ledger, base, "privacy_ledger", source) if ledger is not None else None,
        synthetic_rehearsal=synthetic,
        share_local_model=share,
    )


def load_site_config(path: Path) -> SiteConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"site config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return parse_site_config(raw, path)


class JobRefused(ValueError):
    """A job this hospital will not start under its own settings (the reason names the fix)."""


def check_job_for_site(
    site: SiteConfig, policy: Optional[PrivacyPolicy], norm: str, *, where: str, config: str, simulator: bool
) -> None:
    """The hospital's own start-up rules for a job, given `policy` (the strictest of the site's and the job's privacy
    scope's) and the job's `norm`. Raises JobRefused naming the fix: no policy at all is allowed only on data the
    site marks synthetic (or in the simulator, which has no scopes to set one); DP-SGD cannot privatise BatchNorm.
    The Executor calls it at set-up, and tests/test_docs.py checks every documented job against it."""
    if policy is None and not site.synthetic_rehearsal and not simulator:
        raise JobRefused(
            f"no privacy policy applies to this job at {where} (neither {config} nor the job's privacy scope sets "
            "one); only a site whose fedmed_site.json marks its data \"synthetic_rehearsal\" "
            "trains without DP"
        )
    if policy is not None and norm != "group":
        raise JobRefused(
            f"this site's privacy policy requires DP-SGD, but the job's model uses {norm} normalisation, which DP-SGD "
            "cannot privatise; the job must use norm='group'"
        )
