"""A hospital's privacy set-up for a job, a part of the Executor (fedmed.flare.executor): the policy it trains
under (the strictest of its own and the job's NVFlare privacy scope) and its lifetime privacy ledger."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Optional

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from fedmed.data.loading import load_items
from fedmed.flare.filters import UpdateNoiseFilter
from fedmed.job import constants as C
from fedmed.privacy.ledger import LEDGER_FILENAME, LedgerBinding, PrivacyLedger
from fedmed.privacy.policy import DEFAULT_DELTA, parse_privacy, strictest


class SiteSettingsRefused(RuntimeError):
    """The job tried to set what only the site may set (or the site's own privacy state is unusable). The site
    stays up and refuses every task of the job with this reason, so the server records it and the run fails."""


def scope_in_privacy_file(path: Path, name: str) -> Optional[tuple[str, dict]]:
    """(scope name, properties) of the scope `name` (empty: the default scope) in a site's NVFlare privacy.json, as
    NVFlare's privacy manager resolves it; None when the file or the scope is absent."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        scopes = {s["name"]: s for s in doc.get("scopes", [])}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid NVFlare privacy file: {e!r}") from None
    scope = scopes.get(name or doc.get("default_scope") or "")
    if scope is None:
        return None
    props = scope.get("properties") or {}
    return scope["name"], props if isinstance(props, dict) else {}


def privacy_policy(site, fl_ctx: FLContext) -> tuple:
    """(policy, where it came from, the site's UpdateNoiseFilter(s) in the job's scope): the strictest of the site's
    fedmed_site.json policy (site: its SiteConfig) and the one in the job's NVFlare privacy scope
    (<kit>/local/privacy.json, scope properties["fedmed_privacy"])."""
    scope_obj = fl_ctx.get_prop(FLContextKey.SCOPE_OBJECT)
    scope = scope_obj.name if scope_obj is not None else ""
    props = scope_obj.props if scope_obj is not None else {}
    engine = fl_ctx.get_engine()
    if scope_obj is None and engine is not None:
        # NVFlare's simulator does not resolve the job's scope (its run manager sets only the job meta), nor
        # applies the scope's filters; read the scope's properties from the site's privacy.json the way a
        # deployed client resolves them, through the public workspace API.
        found = scope_in_privacy_file(
            Path(engine.get_workspace().get_site_privacy_file_path()),
            (fl_ctx.get_prop(FLContextKey.JOB_META) or {}).get("scope", ""),
        )
        scope, props = found if found is not None else ("", {})
    raw = props.get(C.SCOPE_PRIVACY_KEY) if isinstance(props, dict) else None
    filters = getattr(scope_obj, "task_result_filters", None) or {}
    noise_filters = [f for group in filters.values() for f in group if isinstance(f, UpdateNoiseFilter)]
    try:
        scope_policy = parse_privacy(raw)
    except ValueError as e:
        raise ValueError(f"privacy scope {scope!r} in local/privacy.json: {e}") from e
    policy = strictest(site.privacy, scope_policy)
    sources = [
        name
        for name, p in (("fedmed_site.json", site.privacy), (f"privacy scope {scope!r}", scope_policy))
        if p is policy
    ]
    return policy, (sources[0] if sources else "fedmed_site.json and privacy scope combined"), noise_filters


def open_ledger(site, task, policy, fl_ctx: FLContext) -> LedgerBinding:
    """The site's lifetime ledger (path from fedmed_site.json, else <kit>/local/), verified, bound to this dataset
    (the pseudonymous identities of every image, and patient, the task reads) and this job. A damaged ledger refuses
    the job (SiteSettingsRefused)."""
    path = site.privacy_ledger or Path(fl_ctx.get_engine().get_workspace().get_site_config_dir()) / LEDGER_FILENAME
    ledger = PrivacyLedger(path)
    problem = ledger.verify()
    if problem:
        raise SiteSettingsRefused(
            f"the site's privacy ledger is damaged, so no privacy spend can be accounted: "
            f"{problem}; the privacy officer must check it (scripts/privacy_ledger.py "
            "verify)"
        )
    identities = ledger.dataset_identities((it.path, it.patient_id) for it in load_items(site.data, task))
    return LedgerBinding(
        ledger,
        identities,
        str(fl_ctx.get_job_id()),
        policy.delta if policy else DEFAULT_DELTA,
        policy.lifetime_ceiling if policy else None,
        run=uuid.uuid4().hex[:12],
    )
