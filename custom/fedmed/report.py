"""A report for people: one HTML page plus the same figures as PNG, built from the database only."""

from __future__ import annotations

import html
from pathlib import Path

from fedmed.store.repository import Repository

FIGURES = ("global_auroc_loss.png", "site_trust.png", "privacy_spend.png", "update_decisions.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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
    if not rows:
        raise ValueError(f"run {run_id} has no recorded rounds; nothing to report")
    rounds = [r.round_num + 1 for r in rows]

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(rounds, [r.test_mean_auroc for r in rows], "o-", label="global test mean AUROC")
    ax2 = ax.twinx()
    ax2.plot(rounds, [r.test_loss for r in rows], "s--", color="tab:red", label="test loss")
    ax2.set_ylabel("loss")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    _finish(fig, ax, "mean AUROC", "Global model per round", out_dir / FIGURES[0])

    _per_site_figure(updates, "trust", "trust", "Per-site trust", out_dir / FIGURES[1], "no trust scores", (-0.05, 1.05))
    _per_site_figure(repo.privacy_spend(run_id), "epsilon", "ε spent (cumulative)", "Privacy spend per site",
                     out_dir / FIGURES[2], "no differential privacy in this run")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bottom = [0] * len(rounds)
    for status in ("accepted", "quarantined", "rejected", "refused", "missing"):
        counts = [sum(1 for u in updates if u["round"] + 1 == r and u["status"] == status) for r in rounds]
        ax.bar(rounds, counts, bottom=bottom, label=status)
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.legend(fontsize=8)
    _finish(fig, ax, "site updates", "Update decisions per round", out_dir / FIGURES[3])

    def table(header, body):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><tr>{head}</tr>{trs}</table>"

    round_table = table(
        ["round", "sites aggregated", "other sites", "test mean AUROC", "test loss"],
        [[r.round_num + 1, ", ".join(r.sites_accepted), ", ".join(f"{s} ({st})" for s, st in r.sites_other),
          r.test_mean_auroc, r.test_loss] for r in rows],
    )
    update_table = table(
        ["round", "site", "status", "reason", "samples", "distance", "trust", "weight"],
        [[u["round"] + 1, u["site"], u["status"], u["reason"] or "", u["num_samples"], u["distance"], u["trust"],
          u["aggregation_weight"]] for u in updates],
    )
    alert_table = table(["round", "site", "kind", "message"], [[a["round"] + 1, a["site"], a["kind"], a["message"]]
                                                              for a in alerts]) if alerts else "<p>No alerts.</p>"
    imgs = "".join(f'<img src="{f}" alt="{f}">' for f in FIGURES)
    card_html = ""
    if model is not None:
        warning = model.clinical_use_warning
        lines = model.card.lines() if model.card else ["This model file carries no model card."]
        card_html = ((f'<p style="color:#b00;font-weight:bold">{html.escape(warning)}</p>' if warning else "")
                     + f"<h2>Model card: {html.escape(model.name)}</h2><p>model file sha256 "
                     f"<code>{html.escape(model.sha256)}</code></p><ul>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedmed run {run.id}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} img{{max-width:540px;margin:4px}}</style></head><body>
<h1>fedmed run {run.id}: {html.escape(run.name)}</h1>
<p>job {html.escape(run.job_id)} · aggregation {html.escape(run.aggregation)} · status {html.escape(run.status)} ·
started {run.started_at} · best round {_fmt(None if run.best_round is None else run.best_round + 1)}
(mean AUROC {_fmt(run.best_metric)})</p>
{card_html}
{imgs}
<h2>Rounds</h2>{round_table}<h2>Alerts</h2>{alert_table}<h2>Site updates</h2>{update_table}
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _per_site_figure(rows: list, key: str, ylabel: str, title: str, path: Path, empty_text: str, ylim=None) -> None:
    """One line per site of rows[key] over rounds (rows: dicts with 'round', 'site' and key)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    points = [r for r in rows if r.get(key) is not None]
    for site in sorted({r["site"] for r in points}):
        ax.plot(*zip(*[(r["round"] + 1, r[key]) for r in points if r["site"] == site]), "o-", label=site)
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
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)
