"""Watching a run while it trains: each recorded round goes to TensorBoard and report.html in the server workspace.

    <server run dir>/tb_events/<server name>/   TensorBoard event files (`tensorboard --logdir <run dir>/tb_events`)
    <server run dir>/report/report.html         fedmed.display.report's page, rewritten after a round, at most every 60 s

The scalars (fedmed.display.live_metrics.round_scalars) travel as NVFlare analytics events (nvflare.apis.analytix), the way
NVFlare's own widgets stream metrics, to LiveTBReceiver, NVFlare's TBAnalyticsReceiver in the job's server app.
The report is drawn on a background thread (matplotlib takes about a second a round): the next round starts at
once, and a report still being drawn when another round ends is followed by one for the newest round only; it is
drawn at most every REPORT_EVERY_S seconds (the newest round then) and once more when the run ends.
Nothing here may fail or delay a round: an error is logged once per cause and the round goes on.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.security.logging import secure_format_exception

from fedmed.display.live_metrics import round_scalars
from fedmed.store.repository import RoundRecord

TB_FOLDER = "tb_events"  # under the job's run dir (NVFlare's default), one sub-folder per sender
REPORT_FOLDER = "report"
# report.html is drawn at most this often (seconds between two drawings' starts; the newest round then) and once more
# when the run ends: a drawing costs ~0.4 s of server CPU (matplotlib, five figures), as much as the rest of fedmed's
# round work in bench_overhead's 4.6 s rounds (issue 30); one a minute is ~0.7% of one core. Rounds longer than this
# (a hospital training on real data) are each drawn, as before.
REPORT_EVERY_S = 60.0


class LiveTBReceiver(TBAnalyticsReceiver):
    """NVFlare's TBAnalyticsReceiver, flushed after every record. tensorboard's EventFileWriter otherwise reaches the
    disk every 120 s and at the job's end, so a TensorBoard watching the run would lag it by minutes."""

    def __init__(self, tb_folder: str = TB_FOLDER):
        super().__init__(tb_folder=tb_folder)

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin):
        super().save(fl_ctx, shareable, record_origin)
        writer = self.writers_table.get(record_origin)
        if writer is not None:
            writer.flush()


class LatestOnly:
    """Runs `work(item)` on one background thread for the newest item submitted; items submitted while it works
    replace each other (only the last is done next). min_interval: seconds from one work's start to the next's (the
    newest item waits out the rest; an urgent submit does not). Errors go to on_error; the thread ends when nothing
    is left."""

    def __init__(self, work: Callable, on_error: Callable[[Exception], None], name: str, min_interval: float = 0.0):
        self._work, self._on_error, self._name = work, on_error, name
        self._min_interval = min_interval
        self._lock = threading.Lock()
        self._pending = None
        self._thread: Optional[threading.Thread] = None
        self._urgent = threading.Event()
        self._last_start: Optional[float] = None

    def submit(self, item, urgent: bool = False) -> None:
        with self._lock:
            self._pending = item
            if urgent:
                self._urgent.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name=self._name, daemon=True)
                self._thread.start()

    def wait(self, timeout: float) -> bool:
        """True once nothing is pending or running (within timeout seconds)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not (thread is not None and thread.is_alive())

    def _drain(self) -> None:
        while True:
            with self._lock:
                if self._pending is None:
                    self._thread = None
                    return
            if self._last_start is not None:  # wait out the interval (woken at once by an urgent submit)
                rest = self._min_interval - (time.monotonic() - self._last_start)
                if rest > 0:
                    self._urgent.wait(rest)
            with self._lock:  # only this thread takes items: one is pending
                item, self._pending = self._pending, None
                self._urgent.clear()
            self._last_start = time.monotonic()
            try:
                self._work(item)
            except Exception as e:
                self._on_error(e)


class LiveMetrics:
    """Publishes each recorded round for `component` (the server's controller): analytics events for TensorBoard,
    then report.html rebuilt from the run record."""

    def __init__(self, component: FLComponent):
        self.component = component
        self._warned: set = set()
        self.reports = LatestOnly(self._write_report, self._report_failed, "fedmed-live-report", REPORT_EVERY_S)
        self._last_report = None  # what the last round's report was drawn from

    def publish(self, record: RoundRecord, db_url: Optional[str], recorded: bool = True) -> None:
        """recorded: the round reached the database (not only the journal); the report reads it from there."""
        report_dir = None
        try:
            engine = self.component.engine
            with engine.new_context() as fl_ctx:
                job_id = fl_ctx.get_job_id()
                report_dir = Path(engine.get_workspace().get_run_dir(job_id)) / REPORT_FOLDER
                for s in round_scalars(record):
                    dxo = create_analytic_dxo(s.tag, s.value, AnalyticsDataType.SCALAR, global_step=s.step)
                    send_analytic_dxo(self.component, dxo, fl_ctx)
        except Exception as e:
            self._warn_once(
                "tensorboard", f"round {record.round_num}: live metrics not sent: {secure_format_exception(e)}"
            )
        if report_dir is None:
            return
        if recorded and db_url:
            self._last_report = (db_url, job_id, report_dir, record.round_num)
            self.reports.submit(self._last_report)
        else:
            self._warn_once("journaled", f"round {record.round_num}: report.html not rewritten: the round is journaled")

    def finish(self, timeout: float = 120.0) -> None:
        """At the run's end, once its status is recorded: the report once more, waited for, so the job's workspace
        (which NVFlare packs when the job ends) holds it whole and with the run's final status."""
        if self._last_report is None:
            return
        self.reports.submit(self._last_report, urgent=True)
        if not self.reports.wait(timeout):
            self._warn_once("slow", f"report.html still being drawn after {timeout:.0f}s at the run's end")

    @staticmethod
    def _write_report(item) -> Path:
        from fedmed.display.report import write_report
        from fedmed.store.repository import Repository

        db_url, job_id, report_dir, _ = item
        repo = Repository(db_url, create_schema=False)
        try:
            run_id = repo.run_id_for_job(job_id)
            if run_id is None:
                raise ValueError(f"no run of job {job_id} in the database yet")
            return write_report(repo, run_id, report_dir)
        finally:
            repo.close()

    def _report_failed(self, e: Exception) -> None:
        self._warn_once("report", f"report.html not rewritten: {secure_format_exception(e)}")

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            self.component.logger.warning(message + " (said once per job; the rounds go on)")
