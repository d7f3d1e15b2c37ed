"""A site's end-of-task memory release: fedmed.server.heap.release_round_memory at the hospital, as the Controller does it
at the server.

A site process allocates and frees hundreds of megabytes a round (the global model received and deserialised,
training's batches and gradients, the update serialised and streamed back) and grew ~4 MB a round over 40
simulator rounds (issue 30: 821 -> 954 MB and 823 -> 993 MB, still rising), the pattern the server showed before its
release: freed pages that glibc keeps below buffers still in use, and buffers held by reference cycles until Python's
oldest generation is collected. A component of its own, not a line in the Executor, so it holds whatever the site's
round does and whoever writes it: NVFlare fires AFTER_SEND_TASK_RESULT once the task's result has left the site.
FEDMED_TRIM_HEAP=0 in the site's environment turns it off (fedmed.server.heap).
"""

from __future__ import annotations

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

from fedmed.server.heap import release_round_memory

SITE_MEMORY_ID = "fedmed_site_memory"  # the component's id in a site's app


class SiteMemoryRelease(FLComponent):
    """Collects the task's garbage and returns the freed heap to the operating system after each result is sent."""

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.AFTER_SEND_TASK_RESULT:
            release_round_memory()
