"""Server workflows that measure themselves, for the benchmarks (fedmed.cli.bench_overhead, fedmed.cli.bench_scale).

ProbedFedMedController is fedmed's Controller and ProbedFedAvg is NVFlare's own FedAvg, unchanged except that each
appends one JSON line per round to `probe_file`, taken inside the server process:

- t_send / t_results: monotonic seconds when the round's training task went out and when the workflow had every
  result back (the wait in between is the sites' training and the transfers; NVFlare's FedAvg aggregates each
  result as it arrives, inside that wait);
- t_end: when the round was done (FedAvg: the model saved; fedmed: the model saved, scored and the round recorded);
- cpu: the server process's CPU time (user + system, every thread: NVFlare's messaging and deserialisation, the
  workflow, the database) at t_end; rss / hwm: its resident and peak resident memory then (bytes, /proc/self);
- phases (fedmed only): seconds in engine.step with the wire conversion and signature checks before it
  (`step`), in saving the model (`save`) and in database writes (`record`).

A round's wall time is t_end minus the previous round's t_end (round 1: minus its t_send); its server CPU is the
difference of cpu. Only the benchmarks use these classes; a federation runs FedMedController.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg

from fedmed.cli.bench_sim import memory_now
from fedmed.flare.controller import FedMedController
from fedmed.heap import ENV_TRIM_HEAP, release_round_memory


class _RoundProbe:
    """Marks of the round in progress; write() appends them as one JSON line."""

    def __init__(self, path: str):
        self.path = Path(path) if path else None
        self.round = 0
        self.marks: dict = {}
        self.phases: dict = {}

    def send(self) -> None:
        self.round += 1
        self.marks = {"t_send": time.monotonic()}
        self.phases = {"step": 0.0, "save": 0.0, "record": 0.0}

    def results(self) -> None:
        self.marks["t_results"] = time.monotonic()

    def add(self, phase: str, seconds: float) -> None:
        if phase in self.phases:
            self.phases[phase] += seconds

    def write(self) -> None:
        if self.path is None or not self.marks:
            return
        rss, hwm = memory_now()
        line = {
            "round": self.round,
            **self.marks,
            "t_end": time.monotonic(),
            "cpu": time.process_time(),
            "rss": rss,
            "hwm": hwm,
            "phases": self.phases,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.marks = {}


class ProbedFedAvg(FedAvg):
    def __init__(self, *args, probe_file: str = "", **kwargs):
        """NVFlare's FedAvg (every argument is FedAvg's) that appends a line per round to probe_file."""
        super().__init__(*args, **kwargs)
        self.probe_file = probe_file
        self._probe = _RoundProbe(probe_file)

    def send_model(self, *args, **kwargs):
        self._probe.send()
        return super().send_model(*args, **kwargs)

    def event(self, event_type: str):
        if event_type == AppEventType.BEFORE_AGGREGATION:  # FedAvg's wait for the results is over
            self._probe.results()
        super().event(event_type)

    def save_model(self, model):  # the last step of a FedAvg round
        super().save_model(model)
        if os.environ.get(ENV_TRIM_HEAP) == "1":  # NVFlare's FedAvg with fedmed's end-of-round release (fedmed.heap)
            release_round_memory()
        self._probe.write()


class _TimedRecorder:
    """The Controller's database recorder, with the time of each write added to the round's `record` phase."""

    def __init__(self, db, probe: _RoundProbe):
        self._db, self._probe = db, probe

    def write(self, op, **args):
        t = time.monotonic()
        try:
            return self._db.write(op, **args)
        finally:
            self._probe.add("record", time.monotonic() - t)

    def __getattr__(self, name):
        return getattr(self._db, name)


class ProbedFedMedController(FedMedController):
    def __init__(self, *args, probe_file: str = "", profile_file: str = "", **kwargs):
        """fedmed's Controller (every argument is FedMedController's) that appends a line per round to probe_file;
        with profile_file, cProfile's statistics of the workflow thread's whole run() are dumped there."""
        super().__init__(*args, **kwargs)
        self.probe_file = probe_file
        self.profile_file = profile_file
        self._probe = _RoundProbe(probe_file)

    def run(self):
        if not self.profile_file:
            return super().run()
        import cProfile

        # This thread only (the workflow, where fedmed's round work runs), timed by its CPU time: on a shared
        # machine wall time would count the waits for a core. The threads of fedmed.parallel are not seen.
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        try:
            return super().run()
        finally:
            profile.disable()
            profile.dump_stats(self.profile_file)

    def broadcast_model(self, *args, **kwargs):
        training = kwargs.get("task_name") == self.train_task_name
        if training:
            self._probe.send()
        try:
            return super().broadcast_model(*args, **kwargs)
        finally:
            if training:
                self._probe.results()

    def _start_record(self):
        db, run_uid, resumed = super()._start_record()
        return _TimedRecorder(db, self._probe), run_uid, resumed

    def _log_report(self, report) -> None:  # called right after engine.step
        if "t_results" in self._probe.marks:
            self._probe.add("step", time.monotonic() - self._probe.marks["t_results"])
        super()._log_report(report)

    def save_model(self, model):
        t = time.monotonic()
        super().save_model(model)
        self._probe.add("save", time.monotonic() - t)

    def _log_round(self, *args, **kwargs) -> None:  # the last call of an aggregated round
        super()._log_round(*args, **kwargs)
        self._probe.write()
