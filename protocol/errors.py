"""Error codes and the exception hierarchy of the wire protocol.

Every failure the protocol can report carries a stable machine-readable `code` (an `ErrorCode`), a
human `message` and a `hint` telling the user how to fix it. The same codes travel in `Error`
messages, so a server can turn any exception into a reply with `Error.from_exception` and a client
can turn any reply back into an exception with `RemoteError`.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Stable error codes. Values never change meaning; new codes need a protocol version bump."""

    # The message itself is unacceptable (raised by encode/decode on either side).
    MALFORMED_MESSAGE = "malformed_message"
    VERSION_MISMATCH = "version_mismatch"
    LIMIT_EXCEEDED = "limit_exceeded"
    INVALID_IMAGE = "invalid_image"
    INVALID_ARRAY = "invalid_array"
    # The request was understood but cannot be served (sent by the server).
    INVALID_SETTINGS = "invalid_settings"
    INVALID_MESH = "invalid_mesh"  # a texture request's mesh cannot be used (empty, non-finite, bad indices, ...)
    UNKNOWN_JOB = "unknown_job"
    QUEUE_FULL = "queue_full"
    MODEL_NOT_READY = "model_not_ready"
    OUT_OF_MEMORY = "out_of_memory"
    JOB_FAILED = "job_failed"
    UNSUPPORTED = "unsupported"  # the server offers no such request (see Info.capabilities)
    INTERNAL_ERROR = "internal_error"
    # Detected locally by the client, never sent over the wire by a well-behaved server.
    BACKEND_UNREACHABLE = "backend_unreachable"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


class ProtocolError(Exception):
    """Root of every error this package raises for bad input, bad peers or dead peers."""

    default_code: ErrorCode = ErrorCode.MALFORMED_MESSAGE
    default_hint: str = "Check that the add-on and the backend come from the same release."

    def __init__(self, message: str, *, hint: str | None = None, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        self.code = ErrorCode(code) if code is not None else self.default_code
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        text = f"[{self.code.value}] {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text


class MalformedMessage(ProtocolError):
    """The frames do not form a valid message: bad msgpack, wrong field types, unknown type, ..."""

    default_code = ErrorCode.MALFORMED_MESSAGE


class ProtocolVersionError(ProtocolError):
    """The peer speaks another protocol version; names both so the user knows which side to update."""

    default_code = ErrorCode.VERSION_MISMATCH

    def __init__(self, local_version: int, remote_version: int):
        self.local_version = local_version
        self.remote_version = remote_version
        newer = "this side" if local_version > remote_version else "the peer"
        super().__init__(
            f"peer speaks protocol version {remote_version}, this side speaks version {local_version}",
            hint=f"{newer} is newer: install the same release of the Blender add-on and the backend "
                 f"so both speak one protocol version",
        )


class LimitExceeded(ProtocolError):
    """A size limit was exceeded; names the limit, the value seen and the maximum allowed."""

    default_code = ErrorCode.LIMIT_EXCEEDED

    def __init__(self, limit: str, value: int, maximum: int, *, hint: str | None = None):
        self.limit = limit
        self.value = value
        self.maximum = maximum
        fix = f"raise Limits.{limit} on both the backend and the client"
        super().__init__(f"{limit} is {value}, above the maximum of {maximum}",
                         hint=f"{hint or 'send less data'}, or {fix}")


class InvalidImage(ProtocolError):
    """Image bytes in an unsupported format, or whose dimensions cannot be read."""

    default_code = ErrorCode.INVALID_IMAGE
    default_hint = "Send a PNG, JPEG, WebP, BMP or TIFF file's bytes, unmodified."


class InvalidArray(ProtocolError):
    """An array descriptor or its data is unacceptable (dtype, shape, byte length, values)."""

    default_code = ErrorCode.INVALID_ARRAY
    default_hint = ("Send C-contiguous arrays of an allowed dtype whose frame holds exactly "
                    "prod(shape) * itemsize bytes.")


class BackendUnreachable(ProtocolError):
    """No message of any kind (pong included) arrived from the backend within `dead_after` seconds."""

    default_code = ErrorCode.BACKEND_UNREACHABLE
    default_hint = ("Start the backend (python -m backend serve), check the address and port, the firewall, "
                    "and that both sides use the same CURVE keys if encryption is on.")


class DeadlineExceeded(ProtocolError):
    """The backend is alive but the caller's own time budget for an operation ran out."""

    default_code = ErrorCode.TIMEOUT
    default_hint = "Pass a larger timeout, or None to wait as long as the backend keeps answering."


class JobCancelled(ProtocolError):
    """A job the caller waited for ended cancelled instead of producing a result."""

    default_code = ErrorCode.CANCELLED
    default_hint = "The job was cancelled on request; submit it again to get a result."


class RemoteError(ProtocolError):
    """The server answered with an `Error` message; carries the server's code, message and hint."""

    def __init__(self, code: ErrorCode, message: str, hint: str, job_id: str | None = None):
        super().__init__(message, hint=hint, code=code)
        self.job_id = job_id
