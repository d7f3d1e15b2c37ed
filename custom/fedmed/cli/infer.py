"""Run the global model on DICOM studies: per study a JSON and a CSV row (probability per finding, positive findings
by the model's thresholds, model version and hash), a Grad-CAM overlay PNG per positive finding, optionally a DICOM
Secondary Capture of each overlay; each study logged (pseudonymised) in the inference log.

The task comes from the model file (meta "task", else chest_xray14) or --task. Chest X-ray (multi-label): frontal
CR/DX radiographs, sigmoid probabilities, positive findings by threshold. Brain MRI (multi-class): axial MR slices,
softmax probabilities (the study's are the mean over its slices), the predicted class by argmax, its overlay.

    scripts/infer --model global_model.pt --out results/ STUDY_OR_FOLDER [--secondary-capture] [--structured-report]

From the hospital's PACS over DICOMweb (QIDO-RS query, WADO-RS retrieve of the series the model reads), the
Structured Report and Grad-CAM Secondary Captures stored back into each study with STOW-RS (--no-send: keep them
local):

    scripts/infer --model global_model.pt --out results/ --dicomweb http://pacs:8042/dicom-web \
        [--study-uid UID ...] [--study-date 20260101-20260131] [--modality CR]

The console ends with one block per study: its accession number and study date, the positive findings each with
its probability and threshold, findings withheld as out of distribution, and how each heatmap was made. The inference
record (pseudonymised log, audit key and heads) goes to --record-dir, never into --out.

Exit status: 0 when every file was read; 1 when any file or study was skipped (each is printed with its reason and
listed in results/summary.json); 2 for bad arguments (missing model, no pseudonym key) or a PACS that cannot be
reached or refuses a request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from fedmed.inference.pseudonym import ENV_PSEUDONYM_KEY, load_pseudonym_key
from fedmed.inference.record import ENV_RECORD_DIR
from fedmed.inference.run import RESULTS_CSV, SUMMARY_JSON, InferenceOptions, run_inference
from fedmed.job.tasks import TASKS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, nargs="?", help="a DICOM file, a study folder, or a tree of studies")
    p.add_argument("--model", type=Path, required=True, help="model file (global_model.pt / best_model.pt)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--pseudonym-key-file", type=Path, help=f"site secret for pseudonyms (default ${ENV_PSEUDONYM_KEY})")
    p.add_argument(
        "--record-dir",
        type=Path,
        help=f"the site's folder for the inference record: database, audit key, heads (default ${ENV_RECORD_DIR}, "
        "else <kit>/local/inference when run from a site kit, else ~/.local/state/fedmed/inference); never inside --out",
    )
    p.add_argument("--db-url", help="inference log database (default $FEDMED_DB_URL, else SQLite RECORD_DIR/fedmed.db)")
    p.add_argument("--image-size", type=int, help="preprocessing size (default the model file's, else 128)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the Grad-CAM overlays")
    p.add_argument(
        "--secondary-capture", action="store_true", help="also write each overlay as DICOM Secondary Capture"
    )
    p.add_argument(
        "--structured-report",
        action="store_true",
        help="also write a DICOM Structured Report per study (findings, probabilities, thresholds, model)",
    )
    p.add_argument(
        "--task", choices=sorted(TASKS), help="the model's task (default the model file's, else chest_xray14)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    pacs = p.add_argument_group("PACS (DICOMweb) instead of INPUT")
    pacs.add_argument("--dicomweb", metavar="URL", help="DICOMweb root of the PACS, e.g. http://pacs:8042/dicom-web")
    pacs.add_argument("--study-uid", action="append", default=[], help="StudyInstanceUID to fetch (repeatable)")
    pacs.add_argument(
        "--study-date", metavar="FROM-TO", help="StudyDate range YYYYMMDD-YYYYMMDD (either side may be empty)"
    )
    pacs.add_argument("--modality", help="only studies with this modality, e.g. CR or DX")
    pacs.add_argument("--no-send", action="store_true", help="do not store the SR and Secondary Captures in the PACS")
    a = p.parse_args(argv)
    if (a.input is None) == (a.dicomweb is None):
        p.error("give either INPUT (a DICOM file or folder) or --dicomweb URL")
    query = None
    if a.dicomweb:
        from fedmed.inference.pacs import StudyQuery

        date_from, _, date_to = (a.study_date or "").partition("-")
        if a.study_date and "-" not in a.study_date:
            date_to = date_from  # one day
        try:
            query = StudyQuery(tuple(a.study_uid), date_from or None, date_to or None, a.modality)
        except ValueError as e:
            p.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        key = load_pseudonym_key(a.pseudonym_key_file)
        options = InferenceOptions(
            out_dir=a.out,
            pseudonym_key=key,
            image_size=a.image_size,
            batch_size=a.batch_size,
            heatmaps=not a.no_heatmaps,
            secondary_capture=a.secondary_capture,
            structured_report=a.structured_report,
            db_url=a.db_url,
            task=a.task,
            record_dir=a.record_dir,
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))

    bar = tqdm(total=0, unit="study", desc="studies", disable=None)

    def on_problem(problem):
        tqdm.write(f"SKIPPED {problem.message()}", file=sys.stderr)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    from fedmed.inference.pacs import PacsError, infer_from_dicomweb

    pacs_run = None
    try:
        if query is not None:
            pacs_run = infer_from_dicomweb(
                a.dicomweb, query, a.model, options, send=not a.no_send, on_problem=on_problem, progress=progress
            )
            summary = pacs_run.summary
        else:
            summary = run_inference(a.input, a.model, options, on_problem=on_problem, progress=progress)
    except (ValueError, FileNotFoundError, PacsError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar.close()
    if pacs_run is not None:
        print(
            f"PACS {a.dicomweb}: {pacs_run.studies_found} study(ies) found, {pacs_run.instances_retrieved} "
            f"instance(s) retrieved, {pacs_run.instances_stored} result object(s) stored back"
            + (" (--no-send: kept in the output folder only)" if a.no_send else "")
        )
    ok = sum(r.status == "ok" for r in summary.results)
    images = sum(len(r.images) for r in summary.results)
    if summary.task.is_multiclass:
        counts = {c: sum(r.predicted == c for r in summary.results) for c in summary.task.classes}
        rule = f"task {summary.task.name}, decision: {summary.thresholds_source}"
        decided = "predicted " + ", ".join(f"{c} {n}" for c, n in counts.items())
    else:
        rule = f"thresholds: {summary.thresholds_source}"
        decided = f"{sum(bool(r.positive) for r in summary.results)} with positive findings"
    warning = summary.clinical_use_warning
    if warning:
        print(f"*** {warning} ***")
    print(f"model {summary.model.name}; model file sha256 {summary.model.sha256}; {rule}")
    card = summary.model.card
    for line in card.lines() if card else ["model card: none in this model file"]:
        print(f"  {line}")
    if summary.heatmap_note:
        print(summary.heatmap_note)
    print(summary.ood_note)
    print(
        f"{len(summary.results)} studies: {ok} read ({images} images, {decided}), "
        f"{len(summary.results) - ok} skipped; {len(summary.skipped_files)} file(s) skipped"
    )
    if summary.heatmap_methods:
        print("heatmaps: " + ", ".join(f"{n} {m}" for m, n in summary.heatmap_methods.items()))
    flagged = summary.out_of_distribution
    if flagged:
        print(
            f"OUT OF DISTRIBUTION: {sum(len(v) for v in flagged.values())} image(s) in {len(flagged)} study(ies) are "
            f"unlike the images the model was calibrated on; their probabilities are unreliable: " + ", ".join(flagged)
        )
    for r in summary.results:
        if r.status != "ok":
            print(f"SKIPPED study {r.study_uid}: {r.message}", file=sys.stderr)
        else:
            print("\n".join(study_lines(r, summary)))
    print(
        f"results: {summary.out_dir / RESULTS_CSV}, {summary.out_dir / SUMMARY_JSON}, "
        f"{summary.out_dir / 'studies' / '*' / 'result.json'}; "
        f"inference log: {record_location(summary)}"
    )
    if warning:  # again at the end, where a reader of a long run's output looks
        print(f"*** {warning} ***")
    return summary.exit_status


def _finding(r, f: str) -> str:
    t = r.thresholds.get(f)
    return f"{f} p={r.probabilities[f]:.3f}" + (f" (threshold {t:.3f})" if t is not None else "")


def study_lines(r, summary) -> list:
    """One study for the console: identifiers the clinician can match, the decision with each probability beside
    its threshold, the out-of-distribution flag, and how each heatmap was made."""
    head = f"study {r.study_uid}: accession {r.accession_number or '(none)'}, date {r.study_date or '(none)'}"
    lines = [head + f", {len(r.images)} image(s)"]
    if summary.task.is_multiclass:
        lines.append(f"  predicted: {_finding(r, r.predicted)}")
    elif r.positive:
        lines.append("  positive: " + ", ".join(_finding(r, f) for f in r.positive))
    else:
        closest = max(r.probabilities, key=lambda f: r.probabilities[f] - r.thresholds[f])
        lines.append(f"  no positive finding (closest to its threshold: {_finding(r, closest)})")
    if r.out_of_distribution:
        what = "unreliable" if summary.task.is_multiclass else "unreliable, withheld from the positives"
        withheld = f"; {what}: {', '.join(_finding(r, f) for f in r.unreliable)}" if r.unreliable else ""
        lines.append(
            f"  OUT OF DISTRIBUTION: {len(r.out_of_distribution)} image(s) unlike the training images{withheld}"
        )
    if r.heatmap_methods:
        lines.append("  heatmaps: " + ", ".join(f"{f} {m}" for f, m in r.heatmap_methods.items()))
        lines.extend(f"    {note}" for note in r.heatmap_notes.values())
    return lines


def record_location(summary) -> str:
    """Where the pseudonymised log went: the SQLite file, or the database's dialect only (a URL may hold a
    password)."""
    url = summary.db_url
    return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.split("://")[0]


if __name__ == "__main__":
    sys.exit(main())
