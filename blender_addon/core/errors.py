"""One error type the user sees: a message and a hint, shown as a Blender report, never as a traceback."""

from __future__ import annotations

import logging

from ..protocol import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

# Hints for codes whose server-side hint cannot know what to do in Blender.
BLENDER_HINTS = {
    ErrorCode.BACKEND_UNREACHABLE: "Start the backend or check the address in Preferences > Add-ons > TRELLIS.2 "
                                   "(for a remote server also its CURVE key and your client keys).",
    ErrorCode.VERSION_MISMATCH: "Install the add-on and the backend from the same release.",
}


class AddonError(Exception):
    """A failure the user can act on: `message` says what happened, `hint` what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message, self.hint = message, hint

    def __str__(self) -> str:
        return f"{self.message}. {self.hint}" if self.hint else self.message


def user_error(exc: BaseException) -> AddonError:
    """Any exception as an AddonError: protocol and backend errors keep their hint; anything unexpected is logged
    with its traceback (for the console and bug reports) and reported in one line."""
    if isinstance(exc, AddonError):
        return exc
    if isinstance(exc, ProtocolError):
        return AddonError(f"{_sentence(exc.message)} [{exc.code.value}]", BLENDER_HINTS.get(exc.code, exc.hint))
    log.error("unexpected error", exc_info=exc)
    return AddonError(f"Unexpected error: {type(exc).__name__}: {exc}",
                      "See the system console for details and report it with the backend log.")


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:]
