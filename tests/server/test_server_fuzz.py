"""Fuzzed requests against the shared server, judged by their outcomes: every refusal and every job ending carries a
stable code naming the problem, and none is `internal_error`. The requests mix settings of every wrong type, range
and name with fast valid ones, and images of every kind a user sends by mistake (extreme aspect ratios, corrupt,
truncated, transparent, tiny, not an image); most are refused at once, the rest run through the real pipeline."""

from __future__ import annotations

import io
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from protocol import Error, ErrorCode, Generate, LimitExceeded, ProtocolError, RemoteError, Reprocess, Result
from protocol.settings import GENERATE, REPROCESS, SETTINGS
from server_testkit import FAST_ASSET, connect, corrupt_png, last, png

REQUESTS = 400
OPEN_AT_ONCE = 6  # below the shared server's max_queue
FAST = {"pipeline_type": "512", "sparse_structure_steps": 2, "shape_steps": 2, "texture_steps": 2, **FAST_ASSET}
WRONG_VALUES = [True, False, None, "x", "100", "", [], [1.0], {"a": 1}, -1, 0, 1.5, -0.5, 10**12, 2**63 - 1,
                "1024_cascade", "x" * 5000, [[[[1]]]]]


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def noise(width: int, height: int, alpha: int | None = None) -> np.ndarray:
    rgba = (np.random.default_rng(width * 7919 + height).random((height, width, 4)) * 255).astype(np.uint8)
    if alpha is not None:
        rgba[..., 3] = alpha
    return rgba


IMAGES = {
    "good": png(),
    "8192x1": encoded(noise(8192, 1)),
    "1x4096": encoded(noise(1, 4096)),
    "4096x3": encoded(noise(4096, 3)),
    "1x1": encoded(noise(1, 1)),
    "transparent": encoded(noise(64, 64, alpha=0)),
    "opaque jpeg": encoded(noise(64, 64)[..., :3], "JPEG"),
    "bmp": encoded(noise(32, 48)[..., :3], "BMP"),
    "corrupt pixels": corrupt_png(),
    "truncated": png()[:200],
    "not an image": b"GIF89a but not really" * 10,
    "empty": b"",
}


def fuzzed_settings(rng: random.Random, kind: str) -> dict:
    settings = dict(FAST) if kind == GENERATE else {"faces": 1000, "texture_size": 256}
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.1:
            settings[rng.choice(["colour", "resolution", "steps", ""])] = rng.choice(WRONG_VALUES)
            continue
        setting = rng.choice(SETTINGS.for_request(kind))
        if rng.random() < 0.7:
            settings[setting.name] = rng.choice(WRONG_VALUES)
        elif setting.choices:
            settings[setting.name] = rng.choice(setting.choices).value
        elif setting.kind == "bool":
            settings[setting.name] = rng.random() < 0.5
        elif setting.kind == "float":
            settings[setting.name] = rng.uniform(setting.minimum, setting.maximum)
    for name in ("faces", "texture_size", "sparse_structure_steps", "shape_steps", "texture_steps"):
        if isinstance(settings.get(name), int) and not isinstance(settings[name], bool):
            settings[name] = min(settings[name], FAST.get(name, 1000))  # valid values stay fast on a CPU
    return settings


def test_fuzzed_requests_end_with_stable_codes_and_never_internal_error(server):
    rng = random.Random(11)
    outcomes: Counter[str] = Counter()
    open_jobs: list[str] = []
    with connect(server.endpoint) as client:
        client.hello()
        source = client.generate(png(1), {"seed": 1, **FAST}, timeout=120).job_id

        def collect_one() -> None:
            ending = last(client.events(open_jobs.pop(0), timeout=180))
            outcomes[ending.code.value if isinstance(ending, Error) else ending.TYPE] += 1

        for _ in range(REQUESTS):
            if rng.random() < 0.15:
                request = Reprocess(rng.choice([source, "never-made", "a" * 128]), fuzzed_settings(rng, REPROCESS))
            else:
                request = Generate(IMAGES[rng.choice(list(IMAGES))], fuzzed_settings(rng, GENERATE))
            try:
                open_jobs.append(client.submit(request))
            except RemoteError as refused:
                outcomes[f"refused {refused.code.value}"] += 1
            except (LimitExceeded, ProtocolError) as local:  # the client's own checks (image header, sizes)
                outcomes[f"not sent {local.code.value}"] += 1
            if len(open_jobs) >= OPEN_AT_ONCE:
                collect_one()
        while open_jobs:
            collect_one()
    assert sum(outcomes.values()) == REQUESTS
    assert not any("internal_error" in what for what in outcomes), outcomes
    assert outcomes[Result.TYPE] >= 3 and outcomes[ErrorCode.INVALID_IMAGE.value] >= 3, outcomes
    assert outcomes[f"refused {ErrorCode.INVALID_SETTINGS.value}"] >= 30, outcomes
    print(f"\n[fuzz] {REQUESTS} requests: {dict(sorted(outcomes.items()))}")


@pytest.mark.parametrize("name", ["8192x1", "1x4096", "4096x3"])
def test_an_extreme_aspect_ratio_is_an_invalid_image_job_error(server, name):
    with connect(server.endpoint) as client:
        client.hello()
        job_id = client.submit(Generate(IMAGES[name], {"seed": 1, **FAST}))
        ending = last(client.events(job_id, timeout=120))
    assert isinstance(ending, Error) and ending.code == ErrorCode.INVALID_IMAGE and "crop" in ending.hint
