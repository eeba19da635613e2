"""The local backend process the add-on starts and stops itself.

It runs `<python> -m backend serve --bind tcp://127.0.0.1:<free port> --weights <weights> --store <home>/jobs`: its
job store is the add-on's own (so a backend the user runs by hand, which locks the default store, never stops it from
starting, and results stay re-importable across Blender sessions), and its output goes to `<home>/backend.log`,
whose last lines become the hint when it fails. Like every backend it admits only key holders: it makes the user's
key folder with the `local` keypair on its first start, and the add-on connects with that pair (protocol/keys.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from ..protocol import BackendUnreachable, Client, DeadlineExceeded
from ..protocol.keys import local_client_curve
from .connection import ADDON_VERSION, Say
from .errors import AddonError

STARTUP_TIMEOUT_S = 300.0  # importing torch and binding the socket; model loading is reported later through info


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class LocalBackend:
    """The backend process this Blender session started. Thread-safe: jobs start it from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._config: tuple[str, str] | None = None
        self.address: str | None = None
        self.ready = False  # answered a hello since it was started
        self.log_path: Path | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure_running(self, python: str, weights: str, home: Path, say: Say,
                       startup_timeout: float = STARTUP_TIMEOUT_S) -> str:
        """Start the backend unless it already runs with this python and weights; wait until it answers; return
        its address."""
        with self._lock:
            if self.running and self._config == (python, weights):
                return self.address
            self._stop_locked()
            if not python or not Path(python).is_file():
                raise AddonError(f"The backend Python {python!r} does not exist" if python else
                                 "No backend Python is set",
                                 "Set Preferences > Add-ons > TRELLIS.2 > Backend Python to the python of the backend "
                                 "environment (in a checkout: .venv/bin/python), or use a remote server.")
            home.mkdir(parents=True, exist_ok=True)
            self.log_path = home / "backend.log"
            self.address = f"tcp://127.0.0.1:{free_loopback_port()}"
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
            with open(self.log_path, "wb") as log:  # this run's log only: its end is what errors quote
                self._proc = subprocess.Popen(
                    [python, "-m", "backend", "serve", "--bind", self.address, "--weights", weights,
                     "--store", str(home / "jobs")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            self._config, self.ready = (python, weights), False
            say("starting the local backend")
            self._wait_ready(time.monotonic() + startup_timeout)
            self.ready = True
            return self.address

    def _wait_ready(self, deadline: float) -> None:
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise AddonError(f"The local backend stopped during start-up (exit code {code})",
                                 f"Its log {self.log_path} ends with: {log_tail(self.log_path)}")
            try:
                curve = local_client_curve()
                if curve is None:  # the backend has not made its keys yet
                    time.sleep(0.2)
                    raise DeadlineExceeded("no local keys yet")
                with Client(self.address, timeout=2.0, heartbeat_interval=0.2, dead_after=1.0, **curve,
                            client_name="blender start-up probe", client_version=ADDON_VERSION) as probe:
                    probe.hello()
                return
            except (BackendUnreachable, DeadlineExceeded, ValueError):
                if time.monotonic() > deadline:
                    self._stop_locked()
                    raise AddonError("The local backend did not answer in time",
                                     f"See its log {self.log_path}: {log_tail(self.log_path)}") from None

    def exit_error(self) -> AddonError | None:
        """The backend's own death (not a stop we asked for) as an error naming its exit code and log, else None."""
        code = self._proc.poll() if self._proc is not None else None
        if code is None:
            return None
        return AddonError(f"The local backend stopped unexpectedly (exit code {code})",
                          f"Its log {self.log_path} ends with: {log_tail(self.log_path)}")

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def _stop_locked(self) -> None:
        """SIGTERM (the backend checkpoints and exits), then kill if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
