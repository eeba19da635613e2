"""The failures a job can meet that the user can act on, raised by the model, asset and voxel code alike.

Each carries a `message` (what went wrong), a `hint` (what to do) and a `code`: the wire protocol's error code it
travels as (protocol.ErrorCode values; a test keeps them valid). Keeping these torch-free and protocol-free lets the
model code raise them and the server map them without either knowing the other.
"""

from __future__ import annotations


class JobFailure(Exception):
    """This job cannot be done as asked; another input or setting may work."""

    code = "job_failed"

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message} ({hint})")
        self.message, self.hint = message, hint


class NoSurface(JobFailure):
    """The model made nothing to build a mesh from (no voxels, or no faces left): a seed or image issue, not a bug."""

    def __init__(self, where: str) -> None:
        super().__init__(f"the model produced no surface ({where})", "try another seed or image")


class InvalidInput(JobFailure):
    """The image or mesh given cannot be used."""

    code = "invalid_image"


class UnsupportedSetting(JobFailure):
    """A valid setting this backend cannot serve (e.g. a pipeline type its checkpoint lacks)."""

    code = "invalid_settings"


class OutOfMemory(JobFailure):
    code = "out_of_memory"


class ModelUnavailable(JobFailure):
    """Weights or a helper model are missing or cannot be loaded; the hint says how to get them."""

    code = "model_not_ready"
