"""Cross-site evaluation, the pure part (no NVFlare, no SQL): what a hospital may release, what the server accepts
from it, and the site x model matrix the report draws.

After training (or in a job of its own on a recorded model) every hospital scores the global model on its own
validation data, and a hospital whose fedmed_site.json sets "share_local_model" also lends its last local model to
be scored at the others. The server checks every answer here before it is recorded: a hospital chooses what it
sends, so scores outside [0, 1], NaN, classes the task does not have, or a model it was not asked about are refused
whole, with the reason.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from fedmed.job.tasks import TaskSpec
from fedmed.server.wire_checks import find_metric_name_problem

GLOBAL_MODEL = "global"  # the model column of the federation's global model; a local model's column is its site
# Row statuses: "evaluated" (scores recorded), "refused" (the site declined, its reason), "rejected" (the server
# refused what the site sent, the reason), "missing" (no answer), "not_shared" (a local model that was not lent, why;
# recorded on its owner's row).
STATUSES = ("evaluated", "refused", "rejected", "missing", "not_shared")


@dataclass(frozen=True)
class CrossSiteRecord:
    """One cell of the site x model table: `site` scored `model` (GLOBAL_MODEL or the lending site's name)."""

    model: str
    site: str
    status: str
    reason: Optional[str] = None
    score: Optional[float] = None  # the task's score (mean AUROC for chest_xray14, accuracy for brain_mri)
    num_samples: Optional[int] = None
    metrics: dict = field(default_factory=dict)  # "auroc/<class>", "mean_auroc" (+ "accuracy", "macro_f1")
    model_sha256: Optional[str] = None

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"cross-site status must be one of {STATUSES}, got {self.status!r}")
        if self.status == "evaluated" and self.score is None:
            raise ValueError(f"{self.site} on {self.model}: an evaluated cell needs its score")
        if self.status != "evaluated" and not self.reason:
            raise ValueError(f"{self.site} on {self.model}: a {self.status} cell needs its reason")


def allowed_metrics(task: TaskSpec) -> frozenset:
    """Every metric name a site may report for this task: per-class AUROC, their mean, and for a multiclass task its
    accuracy and macro-F1 (fedmed.job.tasks.TaskSpec.scores)."""
    names = {f"auroc/{c}" for c in task.classes} | {"mean_auroc"}
    if task.is_multiclass:
        names |= {"accuracy", "macro_f1"}
    return frozenset(names)


def released_scores(metrics: Mapping, task: TaskSpec) -> dict:
    """What an evaluation puts on the wire: the task's scores only (no loss, which is not a score in [0, 1]), NaN
    ones left out (a class absent from the site's validation data has no AUROC)."""
    allowed = allowed_metrics(task)
    return {k: float(v) for k, v in metrics.items() if k in allowed and math.isfinite(float(v))}


def find_result_problem(metrics, reported_model, asked_model: str, num_samples, task: TaskSpec) -> Optional[str]:
    """Why the server refuses a site's evaluation, or None. reported_model: the model the site says it scored (its
    meta); asked_model: the one the server's task named (NVFlare hands it back from the task, not from the site)."""
    if reported_model != asked_model:
        return f"reports scores for model {reported_model!r}, but was asked about {asked_model!r}"
    if not isinstance(metrics, Mapping) or not metrics:
        return "sent no scores"
    allowed = allowed_metrics(task)
    for name in sorted(metrics, key=str):
        problem = find_metric_name_problem(name)
        if problem:
            return problem
        if name not in allowed:
            what = f"class {name.split('/', 1)[1]!r}" if name.startswith("auroc/") else f"metric {name!r}"
            return f"reports {what}, which task {task.name} does not have (classes: {', '.join(task.classes)})"
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{name} must be a number, got {type(value).__name__}"
        if not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0:
            return f"{name} is {float(value)}, outside [0, 1]"
    if task.score_name not in metrics:
        return f"sent no {task.score_name}, the task's score"
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        return f"num_samples must be a positive integer, got {num_samples!r}"
    return None


def local_model_refusal(share_local_model: bool, trained: bool, he_on: bool, update_noise: bool) -> Optional[str]:
    """Site side: why this hospital does not lend its last local model, or None when it may.

    A DP-SGD site's local model is exactly the update it already released (DP-trained, so lending it again is
    post-processing and costs no epsilon). A site whose privacy comes from an update-noise filter released only the
    noised update: its local model in clear is not covered by its epsilon and never leaves. With HE on, the head of a
    local model travels encrypted under the key every hospital holds; only the aggregate is ever meant to be
    decrypted, so one hospital's head must not be decrypted at another, and the server cannot evaluate it."""
    if not share_local_model:
        return "its policy does not lend its local model (fedmed_site.json share_local_model is off)"
    if not trained:
        return "it trained no local model in this job"
    if he_on:
        return (
            "HE is on: a local model's head is encrypted and only the federation's aggregate is ever decrypted, "
            "so no hospital's own head is shown to the others or the server"
        )
    if update_noise:
        return (
            "its privacy comes from an update-noise filter: only the noised update was released; its local model "
            "in clear is not covered by its epsilon"
        )
    return None


def quarantine_reasons(trust: Mapping, trust_events: Iterable[tuple]) -> dict:
    """site -> why a quarantined hospital is not asked to lend or to score: a hostile site must not have a crafted
    model run on the others' validation data (the scores it is shown would leak about their data), nor put its
    numbers in the table. trust: site -> its state at the end of training (anything with .quarantined and .trust,
    fedmed.server.robust.trust.SiteTrust); trust_events: this job's (round numbered from 1, site, "quarantined" |
    "readmitted", message) in order, the rounds' alerts."""
    since: dict = {}
    for round_num, site, kind, message in trust_events:
        if kind == "quarantined":
            since[site] = (round_num, str(message).removeprefix(f"{site} quarantined: "))
        elif kind == "readmitted":
            since.pop(site, None)
    out = {}
    for site, state in trust.items():
        if not state.quarantined:
            continue
        if site in since:
            round_num, why = since[site]
            out[site] = f"quarantined since round {round_num}: {why}"
        else:
            out[site] = f"quarantined by an earlier job (trust {state.trust:.3f})"
    return out


def asked_sites(connected, gone: Mapping, job_sites, sites, quarantined: Mapping) -> tuple:
    """(the hospitals to ask, {hospital not asked: why}). Asked: every connected hospital NVFlare has not dropped
    (`gone`: site -> why), of `sites` when given (those that answered the last round), that is not quarantined
    (site -> why, quarantine_reasons). Not asked, with the reason its cells carry: the job's other hospitals
    (`job_sites`) and every connected quarantined one."""
    targets = [s for s in connected if s not in gone and s not in quarantined and (sites is None or s in sites)]
    not_asked = {}
    for s in sorted((set(job_sites) | (set(connected) & set(quarantined))) - set(targets)):
        why = (
            quarantined.get(s)
            or gone.get(s)
            or ("not connected" if s not in connected else "no answer in the last round")
        )
        not_asked[s] = f"not asked: {why}"
    return targets, not_asked


_RETURN_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # NVFlare's ReturnCode values: EXECUTION_EXCEPTION, ...


def error_answer_reason(return_code) -> str:
    """The cell's reason for a site that answered with an error return code (NVFlare drops such an answer from the
    results; silence is "no answer within Ns"). The code comes from the site: anything but a return code's shape is
    shown cut short, as a repr."""
    code = return_code if isinstance(return_code, str) and _RETURN_CODE.fullmatch(return_code) else None
    return "the site answered with an error: " + (code or f"an unknown return code {str(return_code)[:40]!r}")


def scores_refusal(release_metrics: bool) -> Optional[str]:
    """Site side: why this hospital returns no scores, or None. Scores are computed on its validation data outside
    DP-SGD, so its epsilon does not cover them: a DP site that keeps its metrics home (release_metrics false) keeps
    these home too."""
    if release_metrics:
        return None
    return (
        "its privacy policy releases no metrics (release_metrics false): scores on its data are not covered by its "
        "epsilon"
    )


@dataclass(frozen=True)
class Heatmap:
    """sites (rows) x models (columns, the global model first) of the task's score; None where a cell has none."""

    sites: tuple
    models: tuple
    values: tuple  # of tuples, values[i][j] = sites[i] scoring models[j]

    def cell(self, site: str, model: str) -> Optional[float]:
        return self.values[self.sites.index(site)][self.models.index(model)]


def heatmap_matrix(rows) -> Heatmap:
    """rows: dicts with "site", "model", "status", "score" (Repository.cross_site_results). Every site that has a
    row is a row; the global model and every model some site evaluated is a column."""
    sites = tuple(sorted({r["site"] for r in rows}))
    scored = {r["model"] for r in rows if r["status"] == "evaluated"}
    models = tuple(sorted(scored, key=lambda m: (m != GLOBAL_MODEL, m)))
    cells = {(r["site"], r["model"]): r["score"] for r in rows if r["status"] == "evaluated"}
    return Heatmap(sites, models, tuple(tuple(cells.get((s, m)) for m in models) for s in sites))


def model_label(model: str) -> str:
    return "global model" if model == GLOBAL_MODEL else f"{model}'s local model"


def evaluation_cell(
    model: str,
    site: str,
    metrics,
    reported_model,
    num_samples,
    task: TaskSpec,
    refused: Optional[str] = None,
    model_sha256: Optional[str] = None,
) -> CrossSiteRecord:
    """The recorded cell for one site's answer about one model: its refusal, the server's refusal of a hostile answer
    (find_result_problem), or the checked scores."""
    if refused is not None:
        return CrossSiteRecord(model, site, "refused", str(refused)[:500], model_sha256=model_sha256)
    problem = find_result_problem(metrics, reported_model, model, num_samples, task)
    if problem:
        return CrossSiteRecord(model, site, "rejected", f"{site} {problem}"[:500], model_sha256=model_sha256)
    return CrossSiteRecord(
        model,
        site,
        "evaluated",
        score=float(metrics[task.score_name]),
        num_samples=num_samples,
        metrics={k: float(v) for k, v in metrics.items()},
        model_sha256=model_sha256,
    )


def summary_line(cells, score_name: str) -> str:
    """One line for the log and the concise console: each model's scores per site."""
    by_model: dict = {}
    for c in cells:
        by_model.setdefault(c.model, []).append(c)
    parts = []
    for model in sorted(by_model, key=lambda m: (m != GLOBAL_MODEL, m)):
        if all(c.status == "not_shared" for c in by_model[model]):
            parts.append(f"{model_label(model)}: not lent (it stays at {model})")  # no site scored it: say why
            continue
        shown = ", ".join(
            f"{c.site} {c.score:.3f}" if c.status == "evaluated" else f"{c.site} {c.status}"
            for c in sorted(by_model[model], key=lambda c: c.site)
        )
        parts.append(f"{model_label(model)}: {shown}")
    return f"cross-site evaluation done ({score_name}): " + "; ".join(parts)
