"""A fake backend for the add-on's tests (core in plain Python, UI and scripts in bpy): it speaks the real protocol
through tests/protocol/protocol_fakes.FakeServer and answers with the synthetic plane of synthetic.py."""

from __future__ import annotations

import protocol as wire
import synthetic
from protocol_fakes import info_for


def backend_handler(events_per_job: int = 3, finish: bool = True):
    """A fake backend: accepts, reports progress, then (if `finish`) sends the synthetic plane as the result."""
    mesh, textures = synthetic.plane_arrays(n=4, texture=8)

    def handle(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Hello):
            return [info_for()]
        if isinstance(msg, wire.Request):
            replies = [wire.Accepted("job-1", 0, msg.client_job_id)]
            replies += [wire.Progress("job-1", "shape", i, events_per_job, i / (events_per_job + 1))
                        for i in range(1, events_per_job + 1)]
            if finish:
                replies.append(wire.Result("job-1", mesh, textures, synthetic.metadata()))
            return replies
        if isinstance(msg, wire.Cancel):
            return [wire.Cancelled(msg.job_id)]
        if isinstance(msg, wire.Fetch):
            return [wire.Result(msg.job_id, mesh, textures, synthetic.metadata())]
        return []

    return handle
