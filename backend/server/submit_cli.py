"""`python -m backend submit IMAGE --server ADDR [-o OUT.glb] [--seed N ...]`: a terminal client with a progress bar.
`--reprocess JOB_ID` rebuilds an earlier job's asset with other asset settings instead.

Handy for remote servers and scripts: it prints the job id first, so a result whose wait was cut short (Ctrl-C
cancels the job; a lost connection does not) can be collected later with `--fetch JOB_ID`. A server that restarts
meanwhile is followed through ("backend restarted, resuming") if it is back within RESUME_FOR_S.
Keys: `--server-key` and `--client-key` for a remote server; without them the `local` keypair a server on this
machine made in its key folder (`--keys`, default ~/.config/trellis2/keys), if there is one.
Exit status: 0 result written, 1 the job failed or was cancelled, 2 bad arguments or no server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from backend.server.results import textured_mesh_from_result
from protocol import (Accepted, BackendUnreachable, Cancelled, Client, Error, Generate, Message, Notice, Progress,
                      ProtocolError, Reprocess, Request, Result)
from protocol.keys import client_curve, default_keys_dir, local_client_curve
from protocol.settings import GENERATE
from protocol.settings_cli import add_setting_arguments, given_settings

DEFAULT_SERVER = "tcp://127.0.0.1:5555"
BAR_WIDTH = 30
RESUME_FOR_S = 120.0  # how long a silent server may take to come back before the wait ends


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("submit", help="send an image to a backend server and save the textured mesh",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("image", type=Path, nargs="?", help="PNG, JPEG, WebP, BMP or TIFF file")
    p.add_argument("--server", default=DEFAULT_SERVER, help="server address (default: %(default)s)")
    p.add_argument("-o", "--output", type=Path, help="the .glb to write (default: IMAGE or JOB_ID with .glb)")
    p.add_argument("--settings", default="{}", metavar="JSON", help="more settings as a JSON map, e.g. ones a newer "
                   "server offers (the flags below win)")
    p.add_argument("--fetch", metavar="JOB_ID", help="collect an earlier job's result instead of submitting")
    p.add_argument("--reprocess", metavar="JOB_ID", help="rebuild an earlier job's mesh and textures with the asset "
                   "settings given here, without generating again")
    p.add_argument("--server-key", type=Path, help="the server's public key file (server.key): turns on CURVE")
    p.add_argument("--client-key", type=Path, help="this client's key_secret file, given with --server-key")
    p.add_argument("--keys", type=Path, default=default_keys_dir(), help="key folder of a server on this machine, "
                   "used without --server-key (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    add_setting_arguments(p, GENERATE)
    p.set_defaults(run=submit_command)


def submit_command(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.image, args.fetch, args.reprocess)) != 1:
        print("error: give one of IMAGE, --fetch JOB_ID or --reprocess JOB_ID", file=sys.stderr)
        return 2
    if (args.server_key is None) != (args.client_key is None):
        print("error: --server-key and --client-key go together", file=sys.stderr)
        return 2
    try:
        settings = json.loads(args.settings)
        if not isinstance(settings, dict):
            raise ValueError("--settings is not a JSON map")
        settings.update(given_settings(args, GENERATE))  # the server refuses any a reprocess does not take
        request: Request | None = None
        if args.image is not None:
            request = Generate(args.image.read_bytes(), settings)
        elif args.reprocess is not None:
            request = Reprocess(args.reprocess, settings)
        curve = (client_curve(args.server_key, args.client_key) if args.server_key
                 else local_client_curve(args.keys) or {})
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output = args.output or Path(args.image.with_suffix(".glb").name if args.image
                                 else f"{args.fetch or args.reprocess}.glb")
    try:
        with Client(args.server, client_name="backend-submit", resume_for=RESUME_FOR_S, **curve) as client:
            info = client.hello()
            if info.workers:
                print(f"server: {info.workers_summary()}, {info.queue_length} job(s) queued or running",
                      file=sys.stderr)
            final = (_fetch(client, args.fetch, args.timeout) if request is None
                     else _run(client, request, args.timeout, args.server))
    except BackendUnreachable as exc:
        print(f"\nerror: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 2
    except ProtocolError as exc:
        print(f"\nerror [{exc.code.value}]: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 1
    if final is None:
        return 130
    if isinstance(final, Error):
        print(f"error [{final.code.value}]: {final.message}\nhint: {final.hint}", file=sys.stderr)
        return 1
    if isinstance(final, Cancelled):
        print(f"job {final.job_id} was cancelled", file=sys.stderr)
        return 1
    written = save_result(final, output)
    print(f"wrote {written} ({len(final.mesh['positions'])} vertices, {len(final.mesh['indices'])} faces)")
    return 0


def _run(client: Client, request: Request, timeout: float | None, server: str) -> Message | None:
    job_id = client.submit(request)
    print(f"job {job_id}", file=sys.stderr)
    bar = ProgressBar(sys.stderr)
    try:
        for msg in client.events(job_id, timeout):
            bar.show(msg)
    except KeyboardInterrupt:
        client.cancel(job_id)
        print(f"\ncancelling job {job_id}", file=sys.stderr)
        return None
    except BackendUnreachable:
        print(f"\nlost the server; the job goes on there. Collect it later with:\n  python -m backend submit "
              f"--fetch {job_id} --server {server}", file=sys.stderr)
        raise
    bar.done()
    return msg


def _fetch(client: Client, job_id: str, timeout: float | None) -> Message:
    print(f"waiting for job {job_id}", file=sys.stderr)
    return client.fetch(job_id, timeout)


class ProgressBar:
    """One redrawn line on a terminal; one line per stage when the stream is a file or pipe."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._stage = ""
        self._fraction = 0.0

    def show(self, msg: Message) -> None:
        if isinstance(msg, Accepted):
            self._line(f"queued, {msg.queue_position} job(s) ahead" if msg.queue_position else "started", 0.0)
        elif isinstance(msg, Progress):
            what = msg.message or (f"{msg.stage} {msg.step}/{msg.total}" if msg.total else msg.stage)
            if self.tty or msg.stage != self._stage:
                self._line(what, msg.fraction)
            self._stage = msg.stage
        elif isinstance(msg, Notice):
            self._line(msg.text, self._fraction)

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")

    def _line(self, what: str, fraction: float) -> None:
        self._fraction = fraction
        filled = int(round(fraction * BAR_WIDTH))
        text = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%} {what}"
        self.stream.write(f"\r{text:<79}" if self.tty else text + "\n")
        self.stream.flush()


def save_result(result: Result, output: Path) -> Path:
    """Write the result as a .glb, or as .npz (arrays plus metadata JSON) when the GLB writer is unavailable."""
    try:
        from backend.asset.glb import write_glb
    except ImportError as exc:  # pygltflib missing on a slim client install
        output = output.with_suffix(".npz")
        print(f"note: no GLB writer here ({exc}); writing the raw arrays to {output}", file=sys.stderr)
        np.savez(output, **result.mesh, **result.textures, metadata=np.array(json.dumps(result.metadata)))
        return output
    write_glb(textured_mesh_from_result(result), output)
    return output
