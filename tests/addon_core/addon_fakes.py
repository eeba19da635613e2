"""A fake backend for the add-on's tests (core in plain Python, UI and scripts in bpy): it speaks the real protocol
through tests/protocol/protocol_fakes.FakeServer and answers generate jobs with the synthetic plane of synthetic.py
and texture jobs with the sent UVs and synthetic textures, as the texture contract says."""

from __future__ import annotations

import numpy as np

import protocol as wire
import synthetic
from protocol_fakes import info_for


TEXTURE_METADATA = {"alpha_mode": "MASK", "alpha_cutoff": 0.4, "double_sided": False, "uvs": "kept", "seed": 1}


def texture_result(msg: wire.Texture, job_id: str = "job-1") -> wire.Result:
    """What a backend answers a Texture request with: the UVs it was sent, textures of the size it was asked for."""
    size = int(msg.settings.get("texture_size", 16))
    return wire.Result(job_id, {"uvs": np.array(msg.mesh["uvs"])}, synthetic.textures(size), dict(TEXTURE_METADATA))


def backend_handler(events_per_job: int = 3, finish: bool = True):
    """A fake backend: accepts, reports progress, then (if `finish`) sends the result: the synthetic plane for a
    generate job, `texture_result` for a texture job."""
    mesh, textures = synthetic.plane_arrays(n=4, texture=8)

    def handle(msg: wire.Message) -> list[wire.Message]:
        if isinstance(msg, wire.Hello):
            return [info_for()]
        if isinstance(msg, wire.Request):
            stage = "texture" if isinstance(msg, wire.Texture) else "shape"
            replies = [wire.Accepted("job-1", 0, msg.client_job_id)]
            replies += [wire.Progress("job-1", stage, i, events_per_job, i / (events_per_job + 1))
                        for i in range(1, events_per_job + 1)]
            if finish and isinstance(msg, wire.Texture):
                replies.append(texture_result(msg))
            elif finish:
                replies.append(wire.Result("job-1", mesh, textures, synthetic.metadata()))
            return replies
        if isinstance(msg, wire.Cancel):
            return [wire.Cancelled(msg.job_id)]
        if isinstance(msg, wire.Fetch):
            return [wire.Result(msg.job_id, mesh, textures, synthetic.metadata())]
        return []

    return handle
