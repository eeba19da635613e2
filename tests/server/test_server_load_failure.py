"""A server whose models fail to load: a job accepted while they were loading ends with that error (nobody would
ever run it), and later requests are refused at once."""

from __future__ import annotations

import threading
import time

import pytest

from backend.server.server import ServerConfig
from protocol import Error, ErrorCode, Generate, ModelStatus, RemoteError
from server_testkit import connect, last, png, serve_in_thread, stop_served, wait_until


def test_jobs_waiting_for_models_that_fail_to_load_end_with_the_load_error(tmp_path) -> None:
    release = threading.Event()

    def failing_load():
        release.wait(10)
        raise FileNotFoundError("no weights in /nowhere")

    server, thread = serve_in_thread(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "store", grace_s=0.0),
                                     failing_load)
    try:
        with connect(server.endpoint) as client:
            assert client.hello().model_status == ModelStatus.LOADING
            job_id = client.submit(Generate(png()))
            release.set()
            final = last(client.events(job_id, timeout=30))
            assert isinstance(final, Error) and final.code == ErrorCode.MODEL_NOT_READY
            assert "no weights in /nowhere" in final.message
            wait_until(lambda: server.worker.status == ModelStatus.FAILED, 10, "the pool to report the failure")
            with pytest.raises(RemoteError) as refused:
                client.submit(Generate(png()))
            assert refused.value.code == ErrorCode.MODEL_NOT_READY
    finally:
        stop_served(server, thread)


def test_loading_progress_shows_in_info_and_in_waiting_jobs(tmp_path) -> None:
    from backend.progress import report_loading
    from protocol import Progress

    release = threading.Event()

    def slow_download():
        for done in range(0, 5):
            report_loading("downloading", "ckpts/flow.safetensors", done * 2**29, 2**31)
            time.sleep(0.6)
        release.wait(20)
        raise FileNotFoundError("the download was cut short")

    server, thread = serve_in_thread(ServerConfig(bind="tcp://127.0.0.1:*", store=tmp_path / "store", grace_s=0.0),
                                     slow_download)
    try:
        with connect(server.endpoint) as client:
            client.hello()
            job_id = client.submit(Generate(png()))
            seen = None
            for msg in client.events(job_id, timeout=20):
                if isinstance(msg, Progress) and msg.stage == "loading":
                    seen = msg
                    break
            assert seen is not None and "downloading ckpts/flow.safetensors" in seen.message
            wait_until(lambda: "GB" in client.info(refresh=True).loading_summary(), 10, "info to show the download")
            info = client.info(refresh=True)
            assert info.model_status == ModelStatus.LOADING and 0 < info.workers[0].loading_fraction <= 1
            release.set()
            final = last(client.events(job_id, timeout=30))
            assert isinstance(final, Error) and final.code == ErrorCode.MODEL_NOT_READY
    finally:
        release.set()
        stop_served(server, thread)
