"""Studies from the hospital's PACS and results back to it, over DICOMweb (dicomweb-client): QIDO-RS to find studies
(by StudyInstanceUID, study date range or modality), WADO-RS to retrieve the series the model reads, and STOW-RS to
store the Structured Report and Grad-CAM Secondary Captures the run wrote.

Retrieved instances are written to a temporary folder that is deleted after the run (they carry patient data); the
outputs name those temporary paths. Only series whose Modality the task's model reads are retrieved, so fedmed's own
earlier SR (Modality SR) and overlays (OT) are never fed back into the model.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pydicom
import requests

from fedmed.inference.run import InferenceOptions, InferenceSummary, run_inference
from fedmed.inference.studies import selection_for

STUDY_UID, SERIES_UID, MODALITY = "0020000D", "0020000E", "00080060"
DATE = re.compile(r"^\d{8}$")


class PacsError(RuntimeError):
    """The PACS could not be reached or refused a request; the message names the server and what failed."""


@dataclass(frozen=True)
class StudyQuery:
    """Which studies to fetch. Args:
    study_uids: these StudyInstanceUIDs (each one QIDO-RS query); the other filters then also apply.
    date_from / date_to: StudyDate range, YYYYMMDD, inclusive (either may be open).
    modality: ModalitiesInStudy, e.g. "CR" or "DX".
    """

    study_uids: tuple = ()
    date_from: Optional[str] = None
    date_to: Optional[str] = None
    modality: Optional[str] = None

    def __post_init__(self):
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value is not None and not DATE.match(value):
                raise ValueError(f"{name} must be a date YYYYMMDD, got {value!r}")
        if self.modality is not None and not re.fullmatch(r"[A-Z]{2,16}", self.modality):
            raise ValueError(f"modality must be a DICOM modality code such as CR or DX, got {self.modality!r}")
        if not (self.study_uids or self.date_from or self.date_to or self.modality):
            raise ValueError(
                "a PACS query needs a study UID, a date range or a modality (fetching every study "
                "in the PACS is refused)"
            )

    def filters(self) -> dict:
        out = {}
        if self.date_from or self.date_to:
            out["StudyDate"] = f"{self.date_from or ''}-{self.date_to or ''}"
        if self.modality:
            out["ModalitiesInStudy"] = self.modality
        return out


# dicomweb_client retries every request 5 times, with waits of 2, 4, 8 and 16 s, also when nothing listens: an
# unreachable PACS kept the clinician waiting 30 s for its error. 3 attempts, 0.5 s then 1 s apart, still ride out a
# PACS restarting or answering 503 / 429 for a moment.
PACS_ATTEMPTS = 3
PACS_BACKOFF_MS = 250


def connect(url: str, timeout: float = 30):
    from dicomweb_client.api import DICOMwebClient

    if not re.match(r"^https?://", url):
        raise ValueError(f"DICOMweb URL must start with http:// or https://, got {url!r}")
    client = DICOMwebClient(url=url, timeout=timeout)
    client.set_http_retry_params(max_attempts=PACS_ATTEMPTS, wait_exponential_multiplier=PACS_BACKOFF_MS)
    return client


def _call(client, what: str, fn, *args, **kwargs):
    """One DICOMweb request; network and HTTP failures become one PacsError naming the server and the request."""
    try:
        return fn(*args, **kwargs)
    except requests.exceptions.HTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise PacsError(f"PACS {client.base_url}: {what} failed with HTTP {status}") from e
    except requests.exceptions.RequestException as e:
        raise PacsError(f"cannot reach the PACS at {client.base_url} ({what}): {type(e).__name__}") from e


def _value(item: dict, tag: str) -> Optional[str]:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def find_studies(client, query: StudyQuery) -> list:
    """StudyInstanceUIDs matching the query (QIDO-RS), sorted, each once."""
    found = set()
    for uid in query.study_uids or (None,):
        filters = query.filters()
        if uid is not None:
            filters["StudyInstanceUID"] = uid
        for item in _call(
            client, "QIDO-RS study search", client.search_for_studies, search_filters=filters, get_remaining=True
        ):
            study = _value(item, STUDY_UID)
            if study:
                found.add(study)
    return sorted(found)


def retrieve_studies(client, study_uids: list, dest: Path, modalities) -> int:
    """WADO-RS retrieve of each study's series whose Modality is one of `modalities` into dest/<n>/; returns the
    number of instances written."""
    count = 0
    for n, study in enumerate(study_uids):
        series = _call(
            client,
            f"QIDO-RS series search of study {study}",
            client.search_for_series,
            study_instance_uid=study,
            get_remaining=True,
        )
        for s in series:
            if _value(s, MODALITY) not in modalities or not _value(s, SERIES_UID):
                continue
            instances = _call(
                client,
                f"WADO-RS retrieve of a series of study {study}",
                client.retrieve_series,
                study_instance_uid=study,
                series_instance_uid=_value(s, SERIES_UID),
            )
            folder = dest / f"study{n:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            for ds in instances:
                ds.save_as(folder / f"{count:06d}.dcm", enforce_file_format=True)
                count += 1
    return count


def result_objects(summary: InferenceSummary) -> list:
    """The DICOM files a run wrote for the PACS: each study's SR and Secondary Captures."""
    paths = []
    for r in summary.results:
        if r.structured_report:
            paths.append(Path(r.structured_report))
        paths.extend(Path(p) for p in r.secondary_captures.values())
    return paths


def store_results(client, paths: list) -> int:
    """STOW-RS of the given DICOM files, one request per study; returns how many instances were stored."""
    by_study: dict = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    stored = 0
    for study, datasets in by_study.items():
        response = _call(
            client,
            f"STOW-RS of {len(datasets)} result object(s) to study {study}",
            client.store_instances,
            datasets=datasets,
            study_instance_uid=study,
        )
        failed = getattr(response, "FailedSOPSequence", None) or []
        if failed:
            raise PacsError(
                f"PACS {client.base_url}: STOW-RS refused {len(failed)} of {len(datasets)} result "
                f"object(s) of study {study}"
            )
        stored += len(datasets)
    return stored


@dataclass
class PacsRun:
    summary: InferenceSummary
    studies_found: int
    instances_retrieved: int
    instances_stored: int


def infer_from_dicomweb(
    url: str,
    query: StudyQuery,
    model_path: Path,
    options: InferenceOptions,
    send: bool = True,
    on_problem: Optional[Callable] = None,
    progress: Optional[Callable] = None,
) -> PacsRun:
    """Find, retrieve, infer and (send=True) store the SR and Secondary Captures back in each study.

    Args:
        url: the DICOMweb root, e.g. http://pacs:8042/dicom-web.
        options: see InferenceOptions; with send=True the SR and Secondary Captures are always written.
    """
    from dataclasses import replace

    from fedmed.inference.model_file import read_model_file

    client = connect(url)
    if send:
        options = replace(options, structured_report=True, secondary_capture=True)
    selection = selection_for(read_model_file(model_path).task(options.task))
    studies = find_studies(client, query)
    if not studies:
        raise PacsError(f"PACS {client.base_url}: no study matches {query}")
    with tempfile.TemporaryDirectory(prefix="fedmed-pacs-") as tmp:
        retrieved = retrieve_studies(client, studies, Path(tmp), set(selection.modalities))
        if retrieved == 0:
            raise PacsError(
                f"PACS {client.base_url}: the {len(studies)} matching study(ies) hold no "
                f"{'/'.join(selection.modalities)} series for this model"
            )
        summary = run_inference(Path(tmp), model_path, options, on_problem=on_problem, progress=progress)
        stored = store_results(client, result_objects(summary)) if send else 0
    return PacsRun(summary, len(studies), retrieved, stored)
