"""Server-site component: after the FL server restarts, close the jobs its previous process left 'running'.

NVFlare 2.9 does not resume a job whose server process died: the job keeps status RUNNING in the job store for
ever (JobRunner.update_abnormal_finished_jobs exists but nothing calls it), the hospitals' job processes end when
they lose the server, and the fedmed run stays 'running' in the database. Listed in the server's
local/resources.json (site_configs/server/resources.json), this component runs in the server's parent process at
start-up, before any job is scheduled: such jobs cannot be running any more, so each is set to
FINISHED:ABNORMAL in the job store and its fedmed run to 'interrupted', keeping the rounds it recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import RunStatus
from nvflare.security.logging import secure_format_exception

from fedmed.store.repository import Repository, resolve_db_url

REASON = "the FL server process stopped while the job was running; NVFlare does not resume jobs"


class InterruptedJobRecorder(FLComponent):
    def __init__(self, db_url: Optional[str] = None):
        """Marks jobs orphaned by a server restart as ended, in NVFlare's job store and in the fedmed database.

        Args:
            db_url: SQLAlchemy URL of the run record; default $FEDMED_DB_URL, else SQLite fedmed.db in the server
                workspace (the same rule as FedMedController).
        """
        super().__init__()
        self.db_url = db_url

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type != EventType.SYSTEM_BOOTSTRAP:  # before the job runner starts scheduling
            return
        engine = fl_ctx.get_engine()
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        if job_manager is None:
            return
        stale = job_manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx)
        if not stale:
            return
        job_ids = [job.job_id for job in stale]
        for job_id in job_ids:
            job_manager.set_status(job_id, RunStatus.FINISHED_ABNORMAL, fl_ctx)
            self.log_warning(
                fl_ctx,
                f"job {job_id} was running when the server stopped: set to "
                f"{RunStatus.FINISHED_ABNORMAL.value} (NVFlare does not resume it)",
            )
        url = resolve_db_url(Path(engine.get_workspace().get_root_dir()), self.db_url)
        try:
            repo = Repository(url)
            try:
                changed = repo.mark_interrupted(job_ids, REASON)
            finally:
                repo.close()
            self.log_warning(fl_ctx, f"fedmed runs marked interrupted (recorded rounds kept): {changed or 'none'}")
        except Exception as e:  # the database must not keep the server from starting
            self.log_error(fl_ctx, f"could not mark runs of jobs {job_ids} interrupted: {secure_format_exception(e)}")
