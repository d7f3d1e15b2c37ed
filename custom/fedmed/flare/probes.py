"""Server workflows that measure themselves, for the benchmarks (fedmed.cli.bench_overhead, fedmed.cli.bench_scale).

RoundProbes is a server component that listens to the events fedmed's Controller fires (NVFlare's ROUND_STARTED,
BEFORE_AGGREGATION, AFTER_AGGREGATION, BEFORE/AFTER_LEARNABLE_PERSIST, ROUND_DONE and fedmed's record events), so the
Controller runs unchanged; ProbedFedAvg is NVFlare's own FedAvg, unchanged except for its probe. Each appends one JSON
line per round to `probe_file`, taken inside the server process:

- t_send / t_results: monotonic seconds when the round's training task went out and when the workflow had every
  result back (the wait in between is the sites' training and the transfers; NVFlare's FedAvg aggregates each
  result as it arrives, inside that wait);
- t_end: when the round was done (FedAvg: the model saved; fedmed: the model saved, scored and the round recorded);
- cpu: the server process's CPU time (user + system, every thread: NVFlare's messaging and deserialisation, the
  workflow, the database, fedmed's live report) at t_end, cpu_results at t_results; rss / hwm: its resident and peak
  resident memory then (bytes, /proc/self);
- phases (fedmed only): seconds in engine.step with the wire conversion and signature checks before it
  (`step`), in saving the model (`save`) and in database writes (`record`).

A round's wall time is t_end minus the previous round's t_end (round 1: minus its t_send); its server CPU is the
difference of cpu. Only the benchmarks use these classes (build_job(server_components={"probes": RoundProbes(...)})).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg

from fedmed.cli.bench_sim import memory_now
from fedmed.job import constants as C
from fedmed.server.heap import ENV_TRIM_HEAP, release_round_memory


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
        self.marks["cpu_results"] = time.process_time()

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
        # NVFlare's FedAvg with fedmed's end-of-round release (fedmed.server.heap)
        if os.environ.get(ENV_TRIM_HEAP) == "1":
            release_round_memory()
        self._probe.write()


class RoundProbes(FLComponent):
    def __init__(self, probe_file: str = "", profile_file: str = ""):
        """Appends a line per round of fedmed's Controller to probe_file; with profile_file, cProfile's statistics of
        the workflow thread from TRAINING_STARTED to TRAINING_FINISHED are dumped there (events are fired on the
        workflow's own thread)."""
        super().__init__()
        self.probe_file = probe_file
        self.profile_file = profile_file
        self._probe = _RoundProbe(probe_file)
        self._since: dict = {}  # phase -> monotonic time its "before" event came
        self._profile = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        now = time.monotonic()
        if event_type == AppEventType.TRAINING_STARTED and self.profile_file:
            import cProfile

            # This thread only (the workflow, where fedmed's round work runs), timed by its CPU time: on a shared
            # machine wall time would count the waits for a core. The threads of fedmed.server.parallel are not seen.
            self._profile = cProfile.Profile(time.thread_time)
            self._profile.enable()
        elif event_type == AppEventType.TRAINING_FINISHED and self._profile is not None:
            self._profile.disable()
            self._profile.dump_stats(self.profile_file)
            self._profile = None
        elif event_type == AppEventType.ROUND_STARTED:
            self._probe.send()
        elif event_type in _STARTS:
            if event_type == AppEventType.BEFORE_AGGREGATION:  # the wait for the sites' results is over
                self._probe.results()
            self._since[_STARTS[event_type]] = now
        elif event_type in _ENDS and _ENDS[event_type] in self._since:
            self._probe.add(_ENDS[event_type], now - self._since.pop(_ENDS[event_type]))
        elif event_type == AppEventType.ROUND_DONE:
            self._probe.write()


# phase -> the events that open and close it
_STARTS = {
    AppEventType.BEFORE_AGGREGATION: "step",  # wire conversion, signature checks and RoundEngine.step
    AppEventType.BEFORE_LEARNABLE_PERSIST: "save",
    C.EVENT_BEFORE_RECORD: "record",
}
_ENDS = {
    AppEventType.AFTER_AGGREGATION: "step",
    AppEventType.AFTER_LEARNABLE_PERSIST: "save",
    C.EVENT_AFTER_RECORD: "record",
}
