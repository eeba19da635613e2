"""The protocol version: the single source of truth, and the compatibility rule.

Rule: two peers are compatible exactly when they speak the same version. Any change to the wire
format (a field added, removed or retyped, a new message type, a new error code, a `Limits` field
added or changed in meaning) bumps PROTOCOL_VERSION. The header keys `v` and `type` keep their
meaning in every version, so any peer can always read the other side's version and name both.
"""

from __future__ import annotations

from .errors import ProtocolVersionError

PROTOCOL_VERSION = 3  # 2: settings schema in info; generate / reprocess / texture replace submit; 3: info.workers,
# server instances in info and pong, greeted pongs, hello's minimum limits


def check_version(remote_version: int) -> None:
    """Raise ProtocolVersionError naming both versions unless `remote_version` is compatible."""
    if remote_version != PROTOCOL_VERSION:
        raise ProtocolVersionError(PROTOCOL_VERSION, remote_version)
