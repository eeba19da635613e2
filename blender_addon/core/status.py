"""The backend status line of the panel (connected, model loaded, GPU), kept fresh by a small thread.

The thread asks the backend for `info` every few seconds with its own Client. The UI's timer tells it where to
ask (`watch`, computed from the preferences on the main thread, as bpy must not be used from other threads) and
reads `snapshot()`, redrawing when it changed. A backend that stops answering shows as unreachable within the Client's
`dead_after` seconds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from ..protocol import Client, Info
from .connection import Connection
from .errors import user_error

INTERVAL_S = 2.0


@dataclass(frozen=True)
class BackendStatus:
    state: str  # "not_started", "connecting", "connected", "unreachable"
    text: str
    info: Info | None = None

    @classmethod
    def from_info(cls, info: Info) -> BackendStatus:
        gpu = ""
        if info.gpu_memory_total:
            gpu = f", {info.gpu_memory_free / 2**30:.1f}/{info.gpu_memory_total / 2**30:.1f} GiB free"
        queue = f", {info.queue_length} job(s)" if info.queue_length else ""
        workers = f" · {info.workers_summary()}" if info.workers else ""
        loading = f" · {info.loading_summary()}" if info.loading_summary() else ""
        return cls("connected", f"model {info.model_status.value.replace('_', ' ')}{loading} · {info.device}{gpu}"
                                f"{queue}{workers}", info)


NOT_STARTED = BackendStatus("not_started", "local backend not running")
CONNECTING = BackendStatus("connecting", "connecting")


class StatusMonitor:
    def __init__(self) -> None:
        self._connection: Connection | None = None
        self._stopping = False
        self._wake = threading.Event()  # set: ask now (new connection, or stop)
        self._status = CONNECTING
        self._thread = threading.Thread(target=self._run, name="trellis2 status", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)

    def watch(self, connection: Connection | None) -> None:
        """Where to ask from now on; None when there is nothing to ask (the local backend is not running)."""
        if connection != self._connection:
            self._connection = connection
            self._wake.set()

    def snapshot(self) -> BackendStatus:
        return self._status

    def _run(self) -> None:
        client: Client | None = None
        current: Connection | None = None
        try:
            while not self._stopping:
                connection = self._connection
                if connection != current and client is not None:
                    client.close()
                    client = None
                current = connection
                if connection is None:
                    self._status = NOT_STARTED
                else:
                    try:
                        client = client or connection.client(timeout=5.0)
                        self._status = BackendStatus.from_info(client.info(refresh=True))
                    except Exception as exc:  # shown in the panel, never raised into Blender
                        self._status = BackendStatus("unreachable", user_error(exc).message)
                self._wake.wait(INTERVAL_S)
                self._wake.clear()
        finally:
            if client is not None:
                client.close()
