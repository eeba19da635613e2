"""CUDA-graph replay of a flow's forward pass while a sampler runs on one token set.

A sampler calls its flow 12 times per stage on tensors of unchanging shapes (the dense structure flow always on
4096 tokens per item; a sparse flow on one voxel set), with or without the doubled guidance batch. Eager PyTorch
pays the CPU cost of ~1,500 kernel launches per forward, which at a few thousand tokens is most of the time; a
replayed graph launches them all at once.

Per input signature (shapes, dtypes, batch layout) the first call runs eagerly, which also warms up cuBLAS,
cuDNN and Triton (nothing may compile or allocate workspaces during a capture); the second call captures the
forward and replays it; later calls copy their inputs into the captured ones and replay. A graph bakes in the
addresses of the weights and of its own memory pool, so graphs live only while their model's weights stay where
they were captured: a session (`captured_graphs`) drops them at its end unless asked to keep them (the dense
flow, whose shapes never change), and `drop_graphs` forgets kept ones when the model leaves the GPU.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from backend.native import graphs_enabled

log = logging.getLogger(__name__)

# What capturing has cost this process so far (the benchmark reports it): graphs made, seconds, failures.
CAPTURE_STATS = {"graphs": 0, "seconds": 0.0, "failures": 0}
_EAGER = "eager"  # an entry whose capture failed: that signature always runs eagerly
KEPT_ATTRIBUTE = "_kept_graphs"


_STREAM: list[torch.cuda.Stream] = []


def _capture_stream() -> torch.cuda.Stream:
    """One side stream for every capture of this process."""
    if not _STREAM:
        _STREAM.append(torch.cuda.Stream())
    return _STREAM[0]


def _weight_pointers(model: nn.Module) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


class _Captured:
    """One captured forward: static inputs, the graph, and its static output."""

    def __init__(self, fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], extra: Any,
                 pool: Any) -> None:
        self.inputs = [t.clone() for t in tensors]
        self.extra = extra  # e.g. the Packing, whose device tensors the graph reads
        self.graph = torch.cuda.CUDAGraph()
        # Captured on a side stream, as `torch.cuda.graph` does, but without its synchronize + empty_cache: with
        # the weights of a whole pipeline resident, emptying the cache before every capture cost seconds.
        stream = _capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                self.output = fn(*self.inputs, extra)
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the capture is broken anyway; keep fn's error
                    self.graph.capture_end()
                raise
            self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

    def replay(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for static, new in zip(self.inputs, tensors):
            static.copy_(new)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the static output


class FlowGraphs:
    """The graphs of one model, keyed by input signature, sharing one memory pool (replays never overlap)."""

    def __init__(self, model: nn.Module) -> None:
        self.weights = _weight_pointers(model)
        self.pool = torch.cuda.graph_pool_handle()
        self.entries: dict[tuple, _Captured | str | None] = {}

    def run(self, fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], extra: Any,
            signature: tuple) -> torch.Tensor:
        """fn(*tensors, extra), eagerly the first time a signature is seen, from its graph afterwards.
        `signature` must name everything about `extra` the forward depends on (e.g. the batch layout)."""
        key = (tuple((tuple(t.shape), t.dtype) for t in tensors), signature)
        entry = self.entries.get(key)
        if key not in self.entries:
            self.entries[key] = None
            return fn(*tensors, extra)
        if entry is None:
            entry = self._capture(fn, tensors, extra)
            self.entries[key] = entry
        if entry is _EAGER:
            return fn(*tensors, extra)
        return entry.replay(tensors)

    def _capture(self, fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], extra: Any
                 ) -> _Captured | str:
        start = time.perf_counter()
        try:
            captured = _Captured(fn, tensors, extra, self.pool)
        except RuntimeError as exc:  # an op that cannot be captured: run this signature eagerly from now on
            CAPTURE_STATS["failures"] += 1
            log.warning("CUDA graph capture failed, running eagerly: %s", str(exc).splitlines()[0])
            return _EAGER
        CAPTURE_STATS["graphs"] += 1
        CAPTURE_STATS["seconds"] += time.perf_counter() - start
        return captured


@contextlib.contextmanager
def captured_graphs(model: nn.Module, keep: bool = False) -> Iterator[None]:
    """While inside, `model.graphs` replays CUDA graphs (a CUDA model, kernel mode "auto"; otherwise nothing
    changes). keep=True keeps the graphs for the next session as long as the weights stay where they are."""
    params = next(model.parameters(), None)
    if not graphs_enabled() or params is None or not params.is_cuda:
        yield
        return
    kept = getattr(model, KEPT_ATTRIBUTE, None)
    graphs = kept if kept is not None and kept.weights == _weight_pointers(model) else FlowGraphs(model)
    model.graphs = graphs
    try:
        yield
    finally:
        model.graphs = None
        setattr(model, KEPT_ATTRIBUTE, graphs if keep else None)


def drop_graphs(model: nn.Module) -> None:
    """Forget a model's kept graphs (and free their memory pool), e.g. before its weights leave the GPU."""
    setattr(model, KEPT_ATTRIBUTE, None)
