"""One inference run: discover studies, read the images the task's model is for, predict in batches, decide, draw
heatmaps, write per-study JSON + one CSV row, and log each study (pseudonymised) in the database.

The task (fedmed.job.tasks) comes from the model file's meta (or InferenceOptions.task): which images are read
(studies.ImageSelection), the probabilities (sigmoid or softmax) and the decision. Multi-label (chest X-ray):
positive findings by per-finding thresholds, an overlay per positive finding. Multi-class (brain MRI): the predicted
class by argmax of the study's probabilities, an overlay for that class.

Outputs under ``out_dir``: ``results.csv`` (one row per study, with the hospital's accession number and study date,
each probability beside its threshold), ``summary.json`` (counts, every skipped file with its reason), and
``studies/<StudyInstanceUID>/result.json`` with ``<finding>.png`` overlays (and ``<finding>.dcm`` Secondary Captures
when asked) for each positive finding or the predicted class. The inference record (pseudonymised database rows and
the audit chain's key) goes to the site's record folder (fedmed.inference.record), never under ``out_dir``.

Out of distribution: a finding above its threshold whose study probability came from an image the OOD guard flags is
withheld from the positive findings and listed as unreliable (``unreliable_findings``), with its probability,
threshold and an overlay marked OUT OF DISTRIBUTION. Withheld rather than only marked, because the positive list is
what the inference log, the SR's "Present" and any worklist built on the CSV act on; listed rather than dropped,
because the clinician should still see what the model said.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fedmed.inference.dicom_out import StudyFindings, secondary_capture, structured_report
from fedmed.inference.model_file import ARGMAX_RULE, ModelFile, read_model_file
from fedmed.inference.ood import FeatureTap
from fedmed.inference.predict import (
    BANNER_TEXT,
    Heatmap,
    HeatmapMaker,
    Preprocessor,
    gradcam_grid,
    gradcam_resolution_note,
    overlay_rgb,
    positive_findings,
    predict_batches,
    stamp_banners,
    write_png,
)
from fedmed.inference.pseudonym import pseudonymise
from fedmed.inference.record import resolve_record
from fedmed.inference.studies import (
    FileProblem,
    StudyPlan,
    discover_studies,
    load_study,
    read_dataset,
    selection_for,
)
from fedmed.job.tasks import CHEST_XRAY14, TaskSpec
from fedmed.store.repository import InferenceRecord, Repository, default_db_url

RESULTS_CSV = "results.csv"
SUMMARY_JSON = "summary.json"
STUDY_JSON = "result.json"
STATUS_OK, STATUS_SKIPPED = "ok", "skipped"
OOD_UNCHECKED = (
    "out-of-distribution: not checked (the model file has no OOD statistics; fedmed-choose-thresholds calibrates them)"
)
OOD_BANNER = "OUT OF DISTRIBUTION: unreliable"
OOD_TEXT = (
    "OUT OF DISTRIBUTION: this image is unlike the images the model was calibrated on; its probabilities are unreliable"
)


@dataclass(frozen=True)
class InferenceOptions:
    """Args:
    out_dir: where results go (created).
    pseudonym_key: the site secret for the keyed hashes written to the database.
    image_size: preprocessing size; default the model file's, else 128.
    batch_size: images per forward pass (and studies per read-ahead chunk).
    heatmaps: draw a Grad-CAM overlay PNG per positive finding.
    secondary_capture: also write each overlay as a DICOM Secondary Capture in the source study (highdicom).
    structured_report: also write a DICOM Structured Report per study (highdicom, TID 1500): findings,
        probabilities, thresholds, model identity and card, not-for-clinical-use and out-of-distribution flags.
    db_url: inference log database; default $FEDMED_DB_URL, else SQLite ``<record_dir>/fedmed.db``.
    record_dir: the site's folder for the inference record (database, audit key and heads); default
        fedmed.inference.record.default_record_dir(). Refused inside out_dir.
    task: the model's task (fedmed.job.tasks name); default the model file's meta "task", else chest_xray14.
    """

    out_dir: Path
    pseudonym_key: bytes
    image_size: Optional[int] = None
    batch_size: int = 16
    heatmaps: bool = True
    secondary_capture: bool = False
    structured_report: bool = False
    db_url: Optional[str] = None
    task: Optional[str] = None
    record_dir: Optional[Path] = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class StudyResult:
    study_uid: str
    study_pseudonym: str
    status: str
    accession_number: str = ""  # the hospital's identifiers, for the clinician's local results only
    study_date: str = ""  # ISO (YYYY-MM-DD) when the header's is a valid YYYYMMDD, else as written
    probabilities: dict = field(default_factory=dict)  # finding -> study-level probability (max over its images)
    positive: list = field(default_factory=list)  # multi-label: findings at or above their threshold, not OOD
    unreliable: list = field(default_factory=list)  # decided on an out-of-distribution image: withheld / marked
    thresholds: dict = field(default_factory=dict)  # multi-label: finding -> its threshold
    predicted: Optional[str] = None  # multi-class: the class of highest study probability
    images: list = field(default_factory=list)  # per image: sop uid, view, file, probabilities
    heatmaps: dict = field(default_factory=dict)  # finding -> PNG path
    heatmap_methods: dict = field(default_factory=dict)  # finding -> grad-cam | relative | flat
    heatmap_notes: dict = field(default_factory=dict)  # finding -> what the reader must know about its map
    secondary_captures: dict = field(default_factory=dict)  # finding -> DICOM path
    structured_report: Optional[str] = None  # the study's SR (DICOM path)
    problems: list = field(default_factory=list)  # FileProblem
    out_of_distribution: list = field(default_factory=list)  # SOP Instance UIDs of images flagged as unlike training
    ignored: list = field(default_factory=list)  # FileProblem
    message: Optional[str] = None


@dataclass
class InferenceSummary:
    model: ModelFile
    thresholds_source: str  # the decision rule: where the thresholds came from, or ARGMAX_RULE
    results: list
    unassigned: list  # FileProblem: files of no study
    out_dir: Path
    db_url: str
    task: TaskSpec = CHEST_XRAY14
    record_dir: Optional[Path] = None  # the site's folder for the inference record
    heatmap_note: Optional[str] = None  # Grad-CAM refused or coarse at this model's resolution
    ood_note: str = OOD_UNCHECKED  # how images were checked for being unlike the training data

    @property
    def out_of_distribution(self) -> dict:
        """Study UID -> SOP Instance UIDs of its images flagged as unlike the calibration data."""
        return {r.study_uid: list(r.out_of_distribution) for r in self.results if r.out_of_distribution}

    @property
    def heatmap_methods(self) -> dict:
        """How many overlays each heatmap method made (grad-cam, relative, flat), over every study."""
        counts: dict = {}
        for r in self.results:
            for method in r.heatmap_methods.values():
                counts[method] = counts.get(method, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def clinical_use_warning(self) -> Optional[str]:
        return self.model.clinical_use_warning

    @property
    def skipped_files(self) -> list:
        return list(self.unassigned) + [p for r in self.results for p in r.problems]

    @property
    def exit_status(self) -> int:
        """0 when every file was read (ignored lateral views do not count), 1 when anything was skipped."""
        return 1 if self.skipped_files or any(r.status == STATUS_SKIPPED for r in self.results) else 0


def _safe_name(uid: str) -> str:
    return re.sub(r"[^0-9A-Za-z.\-]", "_", uid)[:128] or "_"


def _reasons(problems: list) -> str:
    """Reasons only, never paths (they may contain patient names), for the database."""
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.reason] = counts.get(p.reason, 0) + 1
    return "; ".join(f"{n} x {reason}" if n > 1 else reason for reason, n in counts.items())


class InferenceRun:
    """Holds the model, preprocessing, heatmap maker, output files and database for one run."""

    def __init__(self, model_path: Path, options: InferenceOptions):
        self.options = options
        self.model_file = read_model_file(model_path)
        self.task = self.model_file.task(options.task)
        self.findings = self.model_file.classes(self.task)  # finding or class names, in output order
        self.selection = selection_for(self.task)
        self.multiclass = self.task.is_multiclass
        self.thresholds = None if self.multiclass else self.model_file.thresholds(self.findings)
        self.decision_rule = ARGMAX_RULE if self.multiclass else self.thresholds.source
        self.image_size = self.model_file.image_size(options.image_size)
        self.model = self.model_file.build()
        self.preprocess = Preprocessor(self.image_size)
        self.heatmap_note = None
        draw = options.heatmaps
        if draw:
            draw, self.heatmap_note = gradcam_resolution_note(
                gradcam_grid(self.model, self.image_size), self.image_size
            )
        self.heatmap = HeatmapMaker(self.model, self.findings) if draw else None
        self.clinical_use_warning = self.model_file.clinical_use_warning
        self.ood = self.model_file.ood
        self.out_dir = Path(options.out_dir)
        self.record_dir, self.db_url = resolve_record(self.out_dir, options.record_dir, options.db_url)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.db_url == default_db_url(self.record_dir):
            self.record_dir.mkdir(parents=True, exist_ok=True)  # the site's own folder, made on first use
        self.repository = Repository(self.db_url)

    def close(self) -> None:
        self.repository.close()

    def model_json(self) -> dict:
        m = self.model_file
        card = m.card
        return {
            **m.identity(),
            "version": m.version,
            "round": m.meta.get("round"),
            "image_size": self.image_size,
            "norm": m.norm,
            "model_card": card.to_meta() if card else None,
        }

    def process(self, plans: list) -> list:
        """Read, predict (one batched pass over all their images) and write results for a chunk of studies."""
        loaded = [(plan, *load_study(plan)) for plan in plans]
        images = [im for _, ims, _ in loaded for im in ims]
        tensors = torch.stack([self.preprocess(im.pixels) for im in images]) if images else None
        probs, scores = np.zeros((0, 0)), np.zeros(0)
        if images:
            with FeatureTap(self.model) as tap:  # the OOD score reads the same forward pass's pooled features
                probs = predict_batches(self.model, tensors, self.options.batch_size, self.task.probabilities)
            scores = self.ood.score(tap.features()) if self.ood is not None else np.full(len(images), np.nan)
        results, start = [], 0
        for plan, ims, problems in loaded:
            n = len(ims)
            results.append(
                self._study(
                    plan,
                    ims,
                    problems,
                    probs[start : start + n],
                    tensors[start : start + n] if n else None,
                    scores[start : start + n],
                )
            )
            start += n
        return results

    def _study(
        self, plan: StudyPlan, images: list, problems: list, probs: np.ndarray, tensors, ood_scores: np.ndarray
    ) -> StudyResult:
        result = StudyResult(
            plan.study_uid,
            pseudonymise(self.options.pseudonym_key, "study", plan.study_uid),
            STATUS_OK,
            accession_number=plan.accession_number,
            study_date=_iso_date(plan.study_date),
            problems=list(plan.problems) + problems,
            ignored=list(plan.ignored),
        )
        study_dir = self.out_dir / "studies" / _safe_name(plan.study_uid)
        if not images:
            result.status = STATUS_SKIPPED
            result.message = f"no usable {self.selection.description}"
        else:
            if self.multiclass:
                # mean over the study's slices: still a distribution over the classes (sums to 1)
                study_probs = probs.mean(axis=0)
                result.predicted = self.findings[int(np.argmax(study_probs))]
            else:
                study_probs = probs.max(axis=0)  # a finding seen on any frontal view counts for the study
            result.probabilities = {f: float(p) for f, p in zip(self.findings, study_probs)}
            result.images = [self._image_json(im, row, score) for im, row, score in zip(images, probs, ood_scores)]
            flagged = [bool(im["out_of_distribution"]) for im in result.images]
            result.out_of_distribution = [im["sop_instance_uid"] for im, f in zip(result.images, flagged) if f]
            # the image that gave the study each finding's probability (multi-class: the mean uses every slice)
            best = {f: int(np.argmax(probs[:, k])) for k, f in enumerate(self.findings)}
            if self.multiclass:
                drawn = [result.predicted]
                result.unreliable = [result.predicted] if any(flagged) else []
            else:
                result.thresholds = dict(self.thresholds.values)
                drawn = positive_findings(result.probabilities, self.thresholds.values)
                result.unreliable = [f for f in drawn if flagged[best[f]]]
                result.positive = [f for f in drawn if f not in result.unreliable]
            for finding in drawn if self.heatmap else ():
                i = best[finding]
                self._draw(result, study_dir, finding, images[i], tensors[i], flagged[i])
            notes = []
            if result.problems:
                notes.append(f"{len(result.problems)} file(s) skipped: {_reasons(result.problems)}")
            if result.unreliable:
                what = "predicted class" if self.multiclass else "positive finding(s) withheld"
                notes.append(f"out of distribution: {what} unreliable: {', '.join(result.unreliable)}")
            result.message = "; ".join(notes) or None
            if self.options.structured_report:
                self._write_sr(result, study_dir, images)
        self._write_json(result, study_dir)
        self.repository.record_inference(
            InferenceRecord(
                study_pseudonym=result.study_pseudonym,
                patient_pseudonym=pseudonymise(self.options.pseudonym_key, "patient", plan.patient_id),
                model_sha256=self.model_file.sha256,
                model_version=self.model_file.name[:100],
                num_images=len(images),
                positive_findings=self._decided(result),
                status=result.status,
                message=_reasons(result.problems)
                if result.status == STATUS_SKIPPED and result.problems
                else result.message,
            )
        )
        return result

    def _image_json(self, image, row: np.ndarray, ood_score: float) -> dict:
        checked = self.ood is not None
        out = {
            "sop_instance_uid": image.file.sop_instance_uid,
            "view": image.file.view,
            "file": str(image.file.path),
            "probabilities": {f: float(p) for f, p in zip(self.findings, row)},
            "ood_score": float(ood_score) if checked else None,
            "out_of_distribution": bool(ood_score > self.ood.threshold) if checked else None,
        }
        if self.multiclass:
            out["predicted_class"] = self.findings[int(np.argmax(row))]
        return out

    def _decided(self, result: StudyResult) -> tuple:
        """What the log's positive_findings column holds: the positive findings, or the predicted class."""
        if self.multiclass:
            return (result.predicted,) if result.predicted else ()
        return tuple(result.positive)

    def _draw(self, result: StudyResult, study_dir: Path, finding: str, image, tensor: torch.Tensor, ood: bool) -> None:
        heatmap: Heatmap = self.heatmap(tensor, finding)
        result.heatmap_methods[finding] = heatmap.method
        if heatmap.note:
            result.heatmap_notes[finding] = heatmap.note
        rgb = overlay_rgb(tensor[0].numpy(), heatmap.heat, image.pixels.shape)
        # what a reader of the picture must know is in the picture itself (PNG and Secondary Capture), where a header
        # field or a JSON key would go unread
        bottom = [b for b in (OOD_BANNER if ood else None, heatmap.banner) if b]
        rgb = stamp_banners(rgb, top=[BANNER_TEXT] if self.clinical_use_warning else [], bottom=bottom)
        png = study_dir / f"{finding}.png"
        write_png(rgb, png)
        result.heatmaps[finding] = str(png)
        if self.options.secondary_capture:
            rule = ARGMAX_RULE if self.multiclass else f"threshold {self.thresholds.values[finding]:.3f}"
            description = " ".join(
                t
                for t in (
                    OOD_TEXT + "." if ood else None,
                    f"fedmed Grad-CAM {finding} p={result.probabilities[finding]:.3f} ({rule});",
                    f"heatmap {heatmap.method}" + (f" ({heatmap.note});" if heatmap.note else ";"),
                    f"model {self.model_file.name}, model file sha256 {self.model_file.sha256[:12]}",
                )
                if t
            )
            source = read_dataset(image.file.path, stop_before_pixels=True)
            dcm = study_dir / f"{finding}.dcm"
            secondary_capture(
                rgb, source, description, self.clinical_use_warning, out_of_distribution=ood, burned_in=True
            ).save_as(dcm, enforce_file_format=True)
            result.secondary_captures[finding] = str(dcm)

    def _write_sr(self, result: StudyResult, study_dir: Path, images: list) -> None:
        m = self.model_file
        card = m.card
        findings = StudyFindings(
            probabilities=result.probabilities,
            thresholds={} if self.multiclass else self.thresholds.values,
            decided=list(self._decided(result)),
            model_name=m.name,
            model_version=m.version,
            model_file_sha256=m.sha256,
            card_lines=card.lines() if card else ("model card: none in this model file",),
            clinical_use_warning=self.clinical_use_warning,
            out_of_distribution=tuple(result.out_of_distribution),
            ood_note=self.ood_note,
            unreliable=tuple(result.unreliable),
        )
        sources = [read_dataset(im.file.path, stop_before_pixels=True) for im in images]
        dcm = study_dir / "report_sr.dcm"
        study_dir.mkdir(parents=True, exist_ok=True)
        structured_report(findings, sources).save_as(dcm, enforce_file_format=True)
        result.structured_report = str(dcm)

    @property
    def ood_note(self) -> str:
        return self.ood.note() if self.ood is not None else OOD_UNCHECKED

    def ood_json(self, result: StudyResult) -> dict:
        return {
            "checked": self.ood is not None,
            "threshold": self.ood.threshold if self.ood else None,
            "flagged_images": result.out_of_distribution,
            "note": self.ood_note,
        }

    def decision_json(self, result: StudyResult) -> dict:
        """The task's decision: thresholds and positive/negative findings, or the rule and the predicted class."""
        if self.multiclass:
            return {
                "task": self.task.name,
                "decision_rule": ARGMAX_RULE,
                "probabilities": result.probabilities,
                "predicted_class": result.predicted,
                "unreliable_findings": result.unreliable,
            }
        above = set(result.positive) | set(result.unreliable)
        return {
            "thresholds": {"source": self.thresholds.source, "values": self.thresholds.values},
            "probabilities": result.probabilities,
            "positive_findings": result.positive,
            "unreliable_findings": result.unreliable,
            "negative_findings": [f for f in result.probabilities if f not in above],
        }

    def study_json(self, result: StudyResult) -> dict:
        return {
            "clinical_use_warning": self.clinical_use_warning,
            "study_instance_uid": result.study_uid,
            "accession_number": result.accession_number,
            "study_date": result.study_date,
            "study_pseudonym": result.study_pseudonym,
            "status": result.status,
            "message": result.message,
            "model": self.model_json(),
            **self.decision_json(result),
            "out_of_distribution": self.ood_json(result),
            "heatmaps": result.heatmaps,
            "heatmap_methods": result.heatmap_methods,
            "heatmap_notes": result.heatmap_notes,
            "heatmap_note": self.heatmap_note,
            "secondary_captures": result.secondary_captures,
            "structured_report": result.structured_report,
            "images": result.images,
            "skipped_files": [{"file": str(p.path), "reason": p.reason} for p in result.problems],
            "ignored_files": [{"file": str(p.path), "reason": p.reason} for p in result.ignored],
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }

    def _write_json(self, result: StudyResult, study_dir: Path) -> None:
        study_dir.mkdir(parents=True, exist_ok=True)
        (study_dir / STUDY_JSON).write_text(json.dumps(self.study_json(result), indent=2))

    def csv_header(self) -> list:
        """Identifiers first (the hospital's accession number and study date beside the UID), then the decision,
        then each probability followed by its threshold (multi-label), so a positive at p=0.034 shows why."""
        if self.multiclass:
            decision, rule = ["predicted_class", "unreliable_findings"], "decision_rule"
            scores = [f"p_{f}" for f in self.findings]
        else:
            decision, rule = ["positive_findings", "unreliable_findings"], "thresholds"
            scores = [c for f in self.findings for c in (f"p_{f}", f"t_{f}")]
        return (
            ["study_instance_uid", "accession_number", "study_date", "study_pseudonym", "status", "num_images"]
            + decision
            + scores
            + [
                "ood_flagged_images",
                "max_ood_score",
                "heatmaps",
                "model",
                "model_file_sha256",
                rule,
                "message",
                "clinical_use_warning",
            ]
        )

    def _ood_cells(self, result: StudyResult) -> list:
        """Flagged images (count) and the highest score; empty when the model file has no OOD statistics."""
        scores = [im["ood_score"] for im in result.images if im["ood_score"] is not None]
        if self.ood is None or not scores:
            return ["", ""]
        return [len(result.out_of_distribution), f"{max(scores):.3f}"]

    def heatmap_status(self, result: StudyResult) -> str:
        """Per drawn finding how its map was made ("Effusion: grad-cam; Mass: flat"), or why none was drawn."""
        if self.heatmap is None:
            return "not drawn" + (f": {self.heatmap_note}" if self.heatmap_note else " (--no-heatmaps)")
        return "; ".join(f"{f}: {m}" for f, m in result.heatmap_methods.items())

    def csv_row(self, result: StudyResult) -> list:
        scores = []
        for f in self.findings:
            scores.append(f"{result.probabilities[f]:.6f}" if result.probabilities else "")
            if not self.multiclass:
                scores.append(f"{self.thresholds.values[f]:.6f}")
        decided = "|".join(result.positive) if not self.multiclass else result.predicted or ""
        return (
            [
                result.study_uid,
                result.accession_number,
                result.study_date,
                result.study_pseudonym,
                result.status,
                len(result.images),
                decided,
                "|".join(result.unreliable),
            ]
            + scores
            + self._ood_cells(result)
            + [
                self.heatmap_status(result) if result.status == STATUS_OK else "",
                self.model_file.name,
                self.model_file.sha256,
                self.decision_rule,
                result.message or "",
                self.clinical_use_warning or "",
            ]
        )


def _iso_date(value: str) -> str:
    """A DICOM DA (YYYYMMDD) as YYYY-MM-DD, what a clinician reads without thinking; anything else as written."""
    try:
        return dt.datetime.strptime(value, "%Y%m%d").date().isoformat()
    except ValueError:
        return value


def run_inference(
    input_path: Path,
    model_path: Path,
    options: InferenceOptions,
    on_problem: Optional[Callable[[FileProblem], None]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> InferenceSummary:
    """Read every study under input_path (a file, a study folder or a tree) and write the outputs.

    Args:
        input_path: DICOM file or folder.
        model_path: model file (server's global/best model, with or without thresholds).
        options: see InferenceOptions.
        on_problem: called with each skipped file as soon as it is known (the CLI prints it).
        progress: called as progress(studies_done, studies_total) after each chunk.
    """
    if not Path(input_path).exists():
        raise FileNotFoundError(f"DICOM input does not exist: {input_path}")
    run = InferenceRun(model_path, options)
    try:
        discovery = discover_studies(Path(input_path), run.selection)
        for p in discovery.unassigned:
            if on_problem:
                on_problem(p)
        results = []
        plans = list(discovery.studies)
        with open(run.out_dir / RESULTS_CSV, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(run.csv_header())
            for i in range(0, len(plans), options.batch_size):
                for r in run.process(plans[i : i + options.batch_size]):
                    writer.writerow(run.csv_row(r))
                    for p in r.problems:
                        if on_problem:
                            on_problem(p)
                    results.append(r)
                f.flush()
                if progress:
                    progress(len(results), len(plans))
        summary = InferenceSummary(
            run.model_file,
            run.decision_rule,
            results,
            list(discovery.unassigned),
            run.out_dir,
            run.db_url,
            run.task,
            run.record_dir,
            run.heatmap_note,
            run.ood_note,
        )
        (run.out_dir / SUMMARY_JSON).write_text(json.dumps(summary_json(summary), indent=2))
        return summary
    finally:
        run.close()


def summary_json(summary: InferenceSummary) -> dict:
    if summary.task.is_multiclass:
        decision = {"task": summary.task.name, "decision_rule": summary.thresholds_source}
    else:
        decision = {"thresholds": summary.thresholds_source}
    card = summary.model.card
    return {
        "clinical_use_warning": summary.clinical_use_warning,
        "model": {
            **summary.model.identity(),
            "file": str(summary.model.path),
            "version": summary.model.version,
            "model_card": card.to_meta() if card else None,
        },
        **decision,
        "heatmap_note": summary.heatmap_note,
        "heatmap_methods": summary.heatmap_methods,
        "out_of_distribution": {
            "checked": summary.model.ood is not None,
            "note": summary.ood_note,
            "flagged_images": sum(len(v) for v in summary.out_of_distribution.values()),
            "studies": summary.out_of_distribution,
        },
        "studies": len(summary.results),
        "studies_ok": sum(r.status == STATUS_OK for r in summary.results),
        "studies_skipped": [r.study_uid for r in summary.results if r.status == STATUS_SKIPPED],
        "images_read": sum(len(r.images) for r in summary.results),
        "skipped_files": [{"file": str(p.path), "reason": p.reason} for p in summary.skipped_files],
        "ignored_files": [{"file": str(p.path), "reason": p.reason} for r in summary.results for p in r.ignored],
        "exit_status": summary.exit_status,
    }
