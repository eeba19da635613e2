"""`python -m backend submit`: image in, .glb out, progress on stderr; --fetch collects a job again."""

from __future__ import annotations

import argparse
import io
import json
import re

import numpy as np

from backend.asset.glb import read_glb
from backend.server.submit_cli import ProgressBar, register
from protocol import Notice, Progress
from protocol.client import RESTARTED
from server_testkit import FAST_ASSET, png


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["submit", *argv])
    return args.run(args)


def test_submit_writes_a_glb_and_fetch_gets_it_again(server, tmp_path, capsys):
    image = tmp_path / "chair.png"
    image.write_bytes(png())
    settings = json.dumps(FAST_ASSET)
    assert run(str(image), "--server", server.endpoint, "--seed", "3", "--settings", settings,
               "-o", str(tmp_path / "chair.glb")) == 0
    out = capsys.readouterr()
    job_id = re.search(r"job ([0-9a-f]{32})", out.err).group(1)
    assert "sparse_structure" in out.err and "bake" in out.err and "wrote" in out.out
    assert "server: 1 worker" in out.err, "submit says how many workers serve"
    mesh = read_glb(tmp_path / "chair.glb")
    assert len(mesh.indices) > 0 and mesh.base_color.shape == (256, 256, 4)
    assert server.store.get(job_id).settings["seed"] == 3

    assert run("--fetch", job_id, "--server", server.endpoint, "-o", str(tmp_path / "again.glb")) == 0
    again = read_glb(tmp_path / "again.glb")
    assert np.array_equal(again.positions, mesh.positions) and np.array_equal(again.base_color, mesh.base_color)


def test_submit_reports_failures_with_the_servers_words(server, tmp_path, capsys):
    image = tmp_path / "chair.png"
    image.write_bytes(png())
    assert run(str(image), "--server", server.endpoint, "--faces", "1") == 1
    assert "invalid_settings" in capsys.readouterr().err
    assert run("--fetch", "nonexistent-job", "--server", server.endpoint) == 1
    assert "unknown_job" in capsys.readouterr().err
    assert run(str(tmp_path / "missing.png"), "--server", server.endpoint) == 2
    assert run("--server", server.endpoint) == 2, "neither an image nor --fetch"
    assert not list(tmp_path.glob("*.glb"))


def test_the_progress_line_says_when_the_server_restarted():
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar.show(Progress("job-1", "shape", 2, 4, 0.4))
    bar.show(Notice("job-1", RESTARTED))
    assert stream.getvalue().splitlines()[-1].endswith(f" 40% {RESTARTED}"), "the notice keeps the fraction"
