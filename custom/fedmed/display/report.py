"""A report for people: one HTML page plus the same figures as PNG, built from the database only."""

from __future__ import annotations

import html
import io
import os
import tempfile
from pathlib import Path

from fedmed.server.crosssite import heatmap_matrix, model_label
from fedmed.store.repository import Repository

FIGURES = ("global_score.png", "site_trust.png", "privacy_spend.png", "update_decisions.png")
CROSS_SITE_FIGURE = "cross_site.png"
# Per-site lines that coincide (two hospitals with the same trust) must stay two lines: each site gets its own marker
# and line style and is drawn a little to the side of the round.
SITE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
SITE_LINESTYLES = ("-", "--", "-.", ":")
SITE_OFFSET = 0.06  # rounds
SCORE_NAMES = {"mean_auroc": "mean AUROC", "accuracy": "accuracy", "macro_f1": "macro-F1"}
SOURCES = {"global_test": "global test", "site_validation": "sites' weighted validation"}


def score_label(score_name, score_source) -> str:
    """What a round's score is, e.g. "global test accuracy", or "sites' weighted validation mean AUROC" when the
    server had no test set (the aggregated sites' validation scores weighted by their capped sample counts)."""
    name = SCORE_NAMES.get(score_name, score_name or "score")
    return f"{SOURCES[score_source]} {name}" if score_source in SOURCES else name


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def score_figure(rows: list):
    """The global model per round: its score, named for what it is and where it came from (one line per source),
    the mean AUROC where the task's score is another metric, and the test loss on a second axis only when the
    server had a test set (no empty axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for source in [s for s in SOURCES if any(r.score_source == s for r in rows)]:
        mine = [r for r in rows if r.score_source == source and r.score is not None]
        names = {r.score_name for r in mine}
        if mine:
            ax.plot(
                [r.round_num for r in mine],
                [r.score for r in mine],
                "o-",
                label=score_label(names.pop() if len(names) == 1 else None, source),
            )
        auroc = [
            r for r in rows if r.score_source == source and r.mean_auroc is not None and r.score_name != "mean_auroc"
        ]
        if auroc:
            ax.plot(
                [r.round_num for r in auroc],
                [r.mean_auroc for r in auroc],
                "^:",
                label=score_label("mean_auroc", source),
            )
    lines = list(ax.get_lines())
    losses = [(r.round_num, r.test_loss) for r in rows if r.test_loss is not None]
    if losses:
        ax2 = ax.twinx()
        ax2.plot(*zip(*losses), "s--", color="tab:red", label="global test loss")
        ax2.set_ylabel("test loss")
        lines += ax2.get_lines()
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no round was scored", ha="center", va="center", transform=ax.transAxes)
    names = sorted({SCORE_NAMES.get(r.score_name, r.score_name) for r in rows if r.score_name})
    ax.set_ylabel(" / ".join(names) or "score")
    ax.set_xlabel("round")
    ax.set_title("Global model per round")
    _integer_rounds(ax)
    fig.tight_layout()
    return fig


def cross_site_figure(cells: list, score_name):
    """The site x model heatmap of a run's cross-site evaluation (rows: the hospital whose validation data scored
    the model; columns: the global model, then each lent local model), each cell written out; a cell without a score
    is grey and says so."""
    import numpy as np

    plt = _plt()
    m = heatmap_matrix(cells)
    values = np.array([[np.nan if v is None else v for v in row] for row in m.values], dtype=float).reshape(
        len(m.sites), len(m.models)
    )
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(len(m.models), 1), 1.2 + 0.55 * max(len(m.sites), 1)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(m.sites)):
        for j in range(len(m.models)):
            v = values[i, j]
            ax.text(
                j,
                i,
                "-" if np.isnan(v) else f"{v:.3f}",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if np.isnan(v) or v > 0.6 else "white",
            )
    ax.set_xticks(range(len(m.models)), [model_label(x) for x in m.models], rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(m.sites)), m.sites, fontsize=8)
    ax.set_xlabel("model")
    ax.set_ylabel("hospital (its validation data)")
    ax.set_title(f"Cross-site evaluation: {SCORE_NAMES.get(score_name, score_name or 'score')}")
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    return fig


def write_report(repo: Repository, run_id: int, out_dir: Path, model=None) -> Path:
    """Write <out_dir>/report.html and its PNG figures; returns the HTML path.

    Args:
        model: optional fedmed.inference.model_file.ModelFile of this run (global or best model): its identity,
            model card and not-for-clinical-use line head the report.
    """
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = repo.get_run(run_id)
    rows = repo.rounds_table(run_id)
    updates = repo.client_updates(run_id)
    alerts = repo.alerts(run_id)
    cross = repo.cross_site_results(run_id)
    if not rows and not cross:
        raise ValueError(f"run {run_id} has no recorded rounds and no cross-site evaluation; nothing to report")
    rounds = [r.round_num for r in rows]  # numbered from 1, as in the logs

    fig = score_figure(rows)
    save_figure(fig, out_dir / FIGURES[0])
    plt.close(fig)

    _per_site_figure(
        updates, "trust", "trust", "Per-site trust", out_dir / FIGURES[1], "no trust scores", (-0.05, 1.05)
    )
    _per_site_figure(
        repo.privacy_spend(run_id),
        "epsilon",
        "ε spent (cumulative)",
        "Privacy spend per site",
        out_dir / FIGURES[2],
        "no differential privacy in this run",
    )

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * len(rounds)
    for status in ("accepted", "quarantined", "rejected", "refused", "missing"):
        counts = [sum(1 for u in updates if u["round"] == r and u["status"] == status) for r in rounds]
        ax.bar(rounds, counts, bottom=bottom, label=status)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.legend(fontsize=8)
    _finish(fig, ax, "site updates", "Update decisions per round", out_dir / FIGURES[3])

    def table(header, body):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><tr>{head}</tr>{trs}</table>"

    has_loss = any(r.test_loss is not None for r in rows)
    show_auroc = any(r.score_name != "mean_auroc" and r.mean_auroc is not None for r in rows)
    round_table = table(
        ["round", "sites aggregated", "other sites", "score", "score is"]
        + (["mean AUROC"] if show_auroc else [])
        + (["test loss"] if has_loss else []),
        [
            [
                r.round_num,
                ", ".join(r.sites_accepted),
                ", ".join(f"{s} ({st})" for s, st in r.sites_other),
                r.score,
                score_label(r.score_name, r.score_source) if r.score is not None else "not scored",
            ]
            + ([r.mean_auroc] if show_auroc else [])
            + ([r.test_loss] if has_loss else [])
            for r in rows
        ],
    )
    update_table = table(
        ["round", "site", "status", "reason", "samples", "distance", "trust", "weight"],
        [
            [
                u["round"],
                u["site"],
                u["status"],
                u["reason"] or "",
                u["num_samples"],
                u["distance"],
                u["trust"],
                u["aggregation_weight"],
            ]
            for u in updates
        ],
    )
    alert_table = (
        table(
            ["round", "site", "kind", "message"],
            [[a["round"] or "run", a["site"], a["kind"], a["message"]] for a in alerts],
        )
        if alerts
        else "<p>No alerts.</p>"
    )
    cross_html = ""
    if cross:
        score_name = next((c["score_name"] for c in cross if c["score_name"]), None)
        fig = cross_site_figure(cross, score_name)
        fig.savefig(out_dir / CROSS_SITE_FIGURE, dpi=110)
        plt.close(fig)
        per_class = sorted({k for c in cross for k in c["metrics"] if k.startswith("auroc/")})
        cross_html = (
            "<h2>Cross-site evaluation</h2><p>Each hospital scored the global model (and each local model a hospital "
            "lent) on its own validation data; a cell without a score says why.</p>"
            f'<img src="{CROSS_SITE_FIGURE}" alt="{CROSS_SITE_FIGURE}">'
            + table(
                ["model", "hospital", "status", "score", "validation images", "reason"]
                + [k.split("/", 1)[1] for k in per_class],
                [
                    [model_label(c["model"]), c["site"], c["status"], c["score"], c["num_samples"], c["reason"] or ""]
                    + [c["metrics"].get(k) for k in per_class]
                    for c in cross
                ],
            )
        )
    best = next((r for r in rows if r.round_num == run.best_round), None)
    best_label = score_label(best.score_name, best.score_source) if best is not None else "score"
    imgs = "".join(f'<img src="{f}" alt="{f}">' for f in FIGURES)
    card_html = ""
    if model is not None:
        warning = model.clinical_use_warning
        lines = model.card.lines() if model.card else ["This model file carries no model card."]
        card_html = (
            (f'<p style="color:#b00;font-weight:bold">{html.escape(warning)}</p>' if warning else "")
            + f"<h2>Model card: {html.escape(model.name)}</h2><p>model file sha256 "
            f"<code>{html.escape(model.sha256)}</code></p><ul>"
            + "".join(f"<li>{html.escape(line)}</li>" for line in lines)
            + "</ul>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedmed run {run.id}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} img{{max-width:540px;margin:4px}}</style></head><body>
<h1>fedmed run {run.id}: {html.escape(run.name)}</h1>
<p>job {html.escape(run.job_id)} · aggregation {html.escape(run.aggregation)} · status {html.escape(run.status)} ·
started {run.started_at} · best round {_fmt(run.best_round)} ({html.escape(best_label)} {_fmt(run.best_metric)})</p>
{card_html}
{imgs}
<p><small>Per-site figures: each site has its own marker and line style and is drawn slightly to the side of the
round, so sites with equal values stay visible.</small></p>
<h2>Rounds</h2>{round_table}{cross_html}<h2>Alerts</h2>{alert_table}<h2>Site updates</h2>{update_table}
</body></html>"""
    path = out_dir / "report.html"
    write_atomic(path, page.encode("utf-8"))  # last: the page never names a figure not yet written
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path through a temporary file in the same folder and a rename: the server rewrites the report
    after every round while someone may be reading it, and a reader must never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the report is for whoever may read the folder
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    write_atomic(path, buf.getvalue())


def site_lines(ax, rows: list, key: str) -> None:
    """One line per site of rows[key] over rounds (rows: dicts with 'round', 'site' and key), each site with its own
    marker, line style and a small sideways offset, so sites whose values coincide remain distinguishable."""
    points = [r for r in rows if r.get(key) is not None]
    sites = sorted({r["site"] for r in points})
    for i, site in enumerate(sites):
        offset = (i - (len(sites) - 1) / 2) * SITE_OFFSET
        xs, ys = zip(*[(r["round"] + offset, r[key]) for r in points if r["site"] == site])
        ax.plot(
            xs,
            ys,
            marker=SITE_MARKERS[i % len(SITE_MARKERS)],
            linestyle=SITE_LINESTYLES[i % len(SITE_LINESTYLES)],
            markersize=7 - 3 * i / max(len(sites), 1),
            label=site,
        )


def _per_site_figure(rows: list, key: str, ylabel: str, title: str, path: Path, empty_text: str, ylim=None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    site_lines(ax, rows, key)
    points = [r for r in rows if r.get(key) is not None]
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes)
    if ylim:
        ax.set_ylim(*ylim)
    _finish(fig, ax, ylabel, title, path)


def _finish(fig, ax, ylabel: str, title: str, path: Path) -> None:
    _integer_rounds(ax)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)
    _plt().close(fig)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
