"""CUDA graphs of a bound program (`moec.compile(..., mode="reduce-overhead")`): one per token count,
captured at its first call and replayed after, so a decode step costs one graph launch on the host
instead of a launch per kernel.

A graph reads and writes fixed addresses: each captured token count owns static input buffers (the
call's inputs are copied in), its kernels read the weights where the binding holds them (writes into
the weights' memory are seen; a replaced weight makes a new binding, hence new graphs), and its outputs
are static buffers, so a call returns clones (a caller may keep them across calls). A program is
captured only when it is graph-safe (`moec.runtime.program.Program.graph_safe`: fixed-shape device
ops, no host synchronisation). Up to `GraphCache.MAX_GRAPHS` token counts are kept (least recently
used dropped).

``capture(fn)`` is ``torch.cuda`` graph capture by default; tests give a stand-in that replays by
running ``fn`` again on the same static buffers (the same contract: a replay reads the static inputs
and writes the static outputs).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch


def cuda_capture(fn: Callable[[], list]) -> tuple[Callable[[], None], list]:
    """``(replay, outputs)``: ``fn`` run once on a side stream (Triton compiles its kernels, the caching
    allocator settles), then captured into a CUDA graph whose outputs are ``outputs``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


class GraphCache:
    """The captured graphs of one bound program, by token count.

    One call at a time replays (a lock on the host), and on the GPU each replay's stream waits for the
    previous call's clones (an event), so calls from several threads or streams never overwrite static
    buffers another call still reads. A capture that failed is not retried for this binding (`failed`)."""

    MAX_GRAPHS = 8
    MAX_TOKENS = 512        # larger token counts (prefill) run without graphs: their launches cost little

    def __init__(self, capture: Callable = cuda_capture):
        self.capture = capture
        self._graphs: OrderedDict = OrderedDict()   # key -> (static inputs, replay, static outputs)
        self.captures = 0
        self.replays = 0
        self.failed = ""                            # why capturing failed (then calls take no graph)
        self._lock = threading.Lock()
        self._done = None                           # the event recorded after the last call's clones (GPU)

    def run(self, run: Callable[[dict], list], inputs: dict[str, torch.Tensor], key) -> list:
        """``run(inputs)``'s outputs, through the graph captured for ``key`` (captured now if new)."""
        with self._lock:
            got = self._graphs.get(key)
            if got is None:
                static = {k: v.clone(memory_format=torch.contiguous_format) for k, v in inputs.items()}
                replay, outputs = self.capture(lambda: run(static))
                got = self._graphs[key] = (static, replay, outputs)
                self.captures += 1
                while len(self._graphs) > self.MAX_GRAPHS:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            static, replay, outputs = got
            cuda = next(iter(static.values())).is_cuda
            if cuda and self._done is not None:
                torch.cuda.current_stream().wait_event(self._done)
            for k, v in inputs.items():
                static[k].copy_(v)
            replay()
            self.replays += 1
            out = [o.clone() for o in outputs]
            if cuda:
                self._done = torch.cuda.Event()
                self._done.record()
            return out


def not_capturable(x: torch.Tensor) -> str:
    """Why a call on ``x`` cannot be captured ("" when it can): CUDA graphs need a CUDA tensor, and a call
    inside the caller's own capture is captured by that one (a capture cannot start inside another)."""
    if not x.is_cuda:
        return "not on a GPU"
    if torch.cuda.is_current_stream_capturing():
        return "the caller is capturing a CUDA graph (the kernels are captured in it)"
    return ""


def graph_key(inputs: dict[str, torch.Tensor]) -> tuple:
    """What a captured graph is specific to: each input's shape, dtype and device."""
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items())
