"""How long-running work reports progress and is stopped: published stages and the progress callback.

A pipeline publishes its stages (name and a weight: the stage's share of a typical job's time) once, as `Stage`
constants, and calls `progress(stage.name, step, total)` between steps. Whoever drives it (the CLI's progress
line, the server's worker) turns those calls into a fraction of the whole job from the same published list, so a
renamed or added stage can never silently break the fraction. Raising `StopRequested` (or anything) from the
callback stops the work at that step.

Loading (downloading weights, reading checkpoints) reports through `report_loading`, which goes to whoever wraps the
load in `loading_reported_to` on that thread (the server's worker, so `info` and waiting jobs show it) and nowhere
otherwise: the loading code needs no callback threaded through every signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

ProgressCallback = Callable[[str, int, int], None]  # (stage name, step, total steps; 0 when unknown)


@dataclass(frozen=True)
class Stage:
    name: str
    weight: float


class StopRequested(Exception):
    """Raised from a progress callback to stop a job between steps (cancel, shutdown)."""


def ignore_progress(stage: str, step: int, total: int) -> None:
    """A progress callback that reports nowhere."""


# (phase "downloading" or "loading", item: a file or model name, done, total: bytes or models)
LoadingCallback = Callable[[str, str, int, int], None]
_LOADING: ContextVar[LoadingCallback | None] = ContextVar("loading_reporter", default=None)


def report_loading(phase: str, item: str, done: int, total: int) -> None:
    reporter = _LOADING.get()
    if reporter is not None:
        reporter(phase, item, done, total)


@contextlib.contextmanager
def loading_reported_to(reporter: LoadingCallback) -> Iterator[None]:
    token = _LOADING.set(reporter)
    try:
        yield
    finally:
        _LOADING.reset(token)


class StageFraction:
    """Overall fraction of a job from its planned stages: the finished stages' weights plus the running stage's
    weight times its step fraction, over the total. Stages outside the plan leave the fraction where it is."""

    def __init__(self, plan: Sequence[Stage]) -> None:
        total = sum(s.weight for s in plan) or 1.0
        self._start: dict[str, tuple[float, float]] = {}
        done = 0.0
        for s in plan:
            self._start[s.name] = (done / total, s.weight / total)
            done += s.weight
        self.fraction = 0.0

    def update(self, stage: str, step: int, total: int) -> float:
        if stage in self._start:
            start, share = self._start[stage]
            within = min(max(step, 0) / total, 1.0) if total > 0 else 0.0
            self.fraction = min(1.0, max(self.fraction, start + share * within))
        return self.fraction
