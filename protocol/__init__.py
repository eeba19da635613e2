"""The wire contract between the Blender add-on and the backend (msgpack, pyzmq and numpy only).

See README.md in this folder for the message table, framing, versioning, limits and error codes.
"""

from .arrays import ALLOWED_DTYPES
from .client import Client, Notice
from .codec import decode, encode
from .errors import (BackendUnreachable, DeadlineExceeded, ErrorCode, InvalidArray, InvalidImage, JobCancelled,
                     LimitExceeded, MalformedMessage, ProtocolError, ProtocolVersionError, RemoteError)
from .images import SUPPORTED_FORMATS, ImageInfo, check_image, image_info
from .limits import DEFAULT_LIMITS, Limits
from .messages import (MESSAGE_TYPES, Accepted, Cancel, Cancelled, Error, Fetch, Generate, Hello, Info, Message,
                       ModelStatus, Ping, Pong, Progress, Reprocess, Request, Result, Texture, WorkerState,
                       WorkerStatus)
from .settings import SETTINGS, InvalidSettings, Schema, Setting
from .transport import configure_socket, join_envelope, split_envelope
from .version import PROTOCOL_VERSION, check_version

__all__ = [
    "PROTOCOL_VERSION", "check_version",
    "encode", "decode", "split_envelope", "join_envelope", "configure_socket",
    "Message", "MESSAGE_TYPES", "Hello", "Info", "Request", "Generate", "Reprocess", "Texture", "Accepted",
    "Progress", "Result", "Error", "Cancel", "Cancelled", "Fetch", "Ping", "Pong", "ModelStatus", "WorkerState",
    "WorkerStatus",
    "SETTINGS", "Schema", "Setting", "InvalidSettings",
    "Limits", "DEFAULT_LIMITS", "ALLOWED_DTYPES", "SUPPORTED_FORMATS", "ImageInfo", "image_info", "check_image",
    "ErrorCode", "ProtocolError", "MalformedMessage", "ProtocolVersionError", "LimitExceeded", "InvalidImage",
    "InvalidArray", "BackendUnreachable", "DeadlineExceeded", "JobCancelled", "RemoteError",
    "Client", "Notice",
]
