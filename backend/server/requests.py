"""What the server keeps of an accepted request: its kind, its settings as sent (checked against the settings
schema), and for a reprocess the job whose O-Voxel it rebuilds. A texture request's mesh is checked here too, so a
mesh nothing could texture is refused at once (`invalid_mesh`) instead of failing in the queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backend.ovoxel.user_mesh import UserMesh
from protocol import Reprocess, Request, Schema, Texture


@dataclass(frozen=True)
class JobSpec:
    kind: str  # protocol.settings.REQUESTS
    settings: dict[str, Any]  # only what the client gave; defaults are filled in when the job runs
    source_job_id: str | None = None

    @classmethod
    def of(cls, request: Request, schema: Schema) -> JobSpec:
        """The spec of a request; raises protocol.InvalidSettings naming the first bad setting."""
        source = request.source_job_id if isinstance(request, Reprocess) else None
        spec = cls(request.KIND, schema.check(request.KIND, request.settings), source)
        if isinstance(request, Texture):
            UserMesh.from_request(request.mesh)
        return spec


def spec_metadata(spec: JobSpec, resolved: dict[str, Any]) -> dict[str, Any]:
    """What a result records about how it was made: the request and every setting it ran with."""
    meta: dict[str, Any] = {"request": spec.kind, "settings": resolved}
    if spec.source_job_id is not None:
        meta["reprocessed_from"] = spec.source_job_id
    return meta
