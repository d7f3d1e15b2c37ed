"""Watching a run while it trains: each recorded round goes to TensorBoard and report.html in the server workspace.

    <server run dir>/tb_events/server/   TensorBoard event files (`tensorboard --logdir <run dir>/tb_events`)
    <server run dir>/report/report.html  fedmed.report's page, rewritten after every round

The scalars (fedmed.live_metrics.round_scalars) travel as NVFlare analytics events (nvflare.apis.analytix), the way
NVFlare's own widgets stream metrics, to LiveTBReceiver, NVFlare's TBAnalyticsReceiver in the job's server app.
Nothing here may fail a round: an error is logged once per cause and the round goes on.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.analytix import AnalyticsDataType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo, send_analytic_dxo
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.security.logging import secure_format_exception

from fedmed.live_metrics import round_scalars
from fedmed.store.repository import RoundRecord

TB_FOLDER = "tb_events"  # under the job's run dir; NVFlare's default, one sub-folder per sender ("server")
REPORT_FOLDER = "report"


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


class LiveMetrics:
    """Publishes each recorded round for `component` (the server's controller): analytics events for TensorBoard,
    then report.html rebuilt from the run record."""

    def __init__(self, component: FLComponent):
        self.component = component
        self._warned: set = set()

    def publish(self, record: RoundRecord, db_url: str | None, recorded: bool = True) -> None:
        """recorded: the round reached the database (not only the journal); the report reads it from there."""
        try:
            self._send_scalars(record)
        except Exception as e:
            self._warn_once(
                "tensorboard", f"round {record.round_num}: live metrics not sent: {secure_format_exception(e)}"
            )
        if not recorded or not db_url:
            self._warn_once("journaled", f"round {record.round_num}: report.html not rewritten: the round is journaled")
            return
        try:
            path = self._write_report(db_url)
        except Exception as e:
            self._warn_once(
                "report", f"round {record.round_num}: report.html not rewritten: {secure_format_exception(e)}"
            )
            return
        self.component.logger.debug(f"round {record.round_num}: report rewritten at {path}")

    def _send_scalars(self, record: RoundRecord) -> None:
        engine = self.component.engine
        with engine.new_context() as fl_ctx:
            for s in round_scalars(record):
                dxo = create_analytic_dxo(s.tag, s.value, AnalyticsDataType.SCALAR, global_step=s.step)
                send_analytic_dxo(self.component, dxo, fl_ctx)

    def _run_dir(self) -> Path:
        engine = self.component.engine
        with engine.new_context() as fl_ctx:
            return Path(engine.get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def _write_report(self, db_url: str) -> Path:
        from fedmed.report import write_report
        from fedmed.store.repository import Repository

        repo = Repository(db_url, create_schema=False)
        try:
            with self.component.engine.new_context() as fl_ctx:
                run_id = repo.run_id_for_job(fl_ctx.get_job_id())
            if run_id is None:
                raise ValueError("the run is not in the database yet")
            return write_report(repo, run_id, self._run_dir() / REPORT_FOLDER)
        finally:
            repo.close()

    def _warn_once(self, cause: str, message: str) -> None:
        if cause not in self._warned:
            self._warned.add(cause)
            self.component.logger.warning(message + " (said once per job; later rounds go on the same way)")
