"""Which sites NVFlare dropped from this job, a part of the server's workflows (training and cross-site evaluation).

NVFlare's dead-client watch: a site whose job process ended (its parent's heartbeat stops listing the job) or whose
heartbeat stopped (heart_beat_timeout in the server kit) is deemed disconnected after dead_client_grace_period; a
site heard from again in this job is reconnected. Rounds neither send to nor wait for a disconnected site, and
record why it is missing."""

from __future__ import annotations

import threading
import time

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext


class SiteWatch:
    def __init__(self):
        self._gone: dict = {}  # site -> why NVFlare dropped it (until it is heard from again in this job)
        self.job_sites: set = set()  # every site sampled by this job so far
        self._lock = threading.Lock()  # events arrive on NVFlare's threads

    def on_event(self, event_type: str, fl_ctx: FLContext, log) -> None:
        """Called from the workflow's handle_event; log: the workflow (its info / warning)."""
        if event_type == EventType.CLIENT_DISCONNECTED:
            site = fl_ctx.get_prop(FLContextKey.DISCONNECTED_CLIENT_NAME)
            with self._lock:
                self._gone[site] = (
                    f"NVFlare dropped the site at {time.strftime('%H:%M:%S')} (its job process "
                    "ended or its heartbeat stopped; see the site's log)"
                )
            log.warning(f"{site} is disconnected: rounds stop waiting for it until it is heard from again")
        elif event_type == EventType.CLIENT_RECONNECTED:
            site = fl_ctx.get_prop(FLContextKey.RECONNECTED_CLIENT_NAME)
            with self._lock:
                was_gone = self._gone.pop(site, None)
            if was_gone:
                log.info(f"{site} is connected again: it is sampled from the next round")

    def gone(self) -> dict:
        """{site: why} of the sites NVFlare has dropped now."""
        with self._lock:
            return dict(self._gone)
