"""Print the per-round table of a run, read back from the database.

fedmed-rounds [--db-url URL] [--run-id RUN]      (default: $FEDMED_DB_URL, latest run)
(or `python scripts/rounds_table.py ...`, the same command)

RUN is the run number this table prints, the run's uid or a unique prefix of it (as fedmed-submit --resume takes).
A wrong URL, a database that does not exist (nothing is created) or an unknown run is one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sqlalchemy.exc import SQLAlchemyError

from fedmed.cli.reading import ReadError, open_reader, pick_run
from fedmed.job.constants import ENV_DB_URL
from fedmed.job.tasks import CHEST_XRAY14, get_task
from fedmed.store.repository import Repository

# Multi-class runs (task brain_mri) also record these global-test metrics per round; shown when present.
MULTICLASS_COLUMNS = ("accuracy", "macro_f1")
SCORE_LABELS = {"mean_auroc": "mean AUROC", "accuracy": "accuracy", "macro_f1": "macro-F1"}
SOURCE_LABELS = {"global_test": "test", "site_validation": "sites' val"}


def score_label(row) -> str:
    """What a round's score is: e.g. "test accuracy", or "sites' val mean AUROC" when the server had no test set
    (the aggregated sites' validation scores, weighted by their capped counts)."""
    name = SCORE_LABELS.get(row.score_name, row.score_name or "score")
    return f"{SOURCE_LABELS.get(row.score_source, row.score_source or '')} {name}".strip()


def format_table(repo: Repository, run_id: int) -> str:
    run = repo.get_run(run_id)
    rows = repo.rounds_table(run_id)
    task = get_task(json.loads(run.config_json or "{}").get("task") or CHEST_XRAY14.name)  # runs before tasks: chest
    test_metrics = repo.round_metrics(run_id, "global_test")
    extra = [m for m in MULTICLASS_COLUMNS if m != task.score_name and any(m in v for v in test_metrics.values())]
    labels = sorted({score_label(r) for r in rows if r.score is not None}) or [f"{SCORE_LABELS[task.score_name]}"]
    score_head = " / ".join(labels)
    show_auroc = task.score_name != "mean_auroc"
    width = max(15, len(score_head))
    lines = [
        f"run {run.id} '{run.name}' uid {run.uid} (job {run.job_id}, {run.aggregation}, status {run.status})",
        f"{'round':>5}  {'sites':<40} {score_head:>{width}}"
        + (f"  {'mean AUROC':>10}" if show_auroc else "")
        + f"  {'test loss':>9}"
        + "".join(f"  {m:>9}" for m in extra),
    ]
    for r in rows:
        sites = ",".join(r.sites_accepted) + "".join(f" -{s}({st})" for s, st in r.sites_other)
        score = f"{r.score:.4f}" if r.score is not None else "-"
        auroc = (f"  {r.mean_auroc:>10.4f}" if r.mean_auroc is not None else f"  {'-':>10}") if show_auroc else ""
        loss = f"{r.test_loss:.4f}" if r.test_loss is not None else "-"
        values = test_metrics.get(r.round_num, {})
        cells = "".join(f"  {values[m]:>9.4f}" if m in values else f"  {'-':>9}" for m in extra)
        lines.append(f"{r.round_num:>5}  {sites:<40} {score:>{width}}{auroc}  {loss:>9}{cells}")
    for a in repo.alerts(run_id):  # a round without a score because its global model was unusable says why
        if a["kind"] == "global_model_unusable":
            lines.append(f"round {a['round']}: ALERT {a['message']}")
    for r in repo.resumptions(run_id):  # fedmed-submit --resume RUN takes the uid above (or a prefix)
        lines.append(
            f"resumed by job {r['job_id']} from round {r['from_round']} at {r['resumed_at']:%Y-%m-%d %H:%M} "
            f"(was {r['previous_status']})"
        )
    if run.best_round is not None:
        best = next((r for r in rows if r.round_num == run.best_round), None)
        label = score_label(best) if best is not None and best.score is not None else SCORE_LABELS[task.score_name]
        lines.append(f"best: round {run.best_round}, {label} {run.best_metric:.4f}")
    if rows and rows[-1].score is not None:
        lines.append(f"final global model: {score_label(rows[-1])} {rows[-1].score:.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db-url", default=os.environ.get(ENV_DB_URL))
    p.add_argument("--run-id", metavar="RUN", help="run number, uid or a unique prefix of it (default: the latest)")
    a = p.parse_args(argv)
    if not a.db_url:
        p.error(f"give --db-url or set {ENV_DB_URL}")
    try:
        repo = open_reader(a.db_url)
        try:
            print(format_table(repo, pick_run(repo, a.run_id)))
        except SQLAlchemyError as e:
            raise ReadError(f"cannot read the database: {type(e).__name__}") from None
        finally:
            repo.close()
    except ReadError as e:
        print(f"fedmed-rounds: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
