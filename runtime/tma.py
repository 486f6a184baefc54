"""Weight tiles by TMA: a grouped GEMM's expert weights handed to the kernel as tensor descriptors.

On sm90 and sm100 a tensor descriptor lets the kernel fetch a whole ``[BLOCK_N, BLOCK_K]`` weight tile with
one bulk copy into shared memory (``cp.async.bulk.tensor``): no per-thread address math, zero fill past
the expert's N and K. The descriptors are made on the host (`triton.tools.tensor_descriptor`, Triton
3.6 and 3.9), once per launch plan: a bound layer makes them once for its weights. The activations'
rows are gathered (``order``), which a tensor descriptor cannot express, so they stay pointer loads.
The interpreter runs descriptor loads too, so the variant is tested on the CPU; ahead-of-time compiles
check the bulk copies (`moec.runtime.aot.AotReport.tma`).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from moec import env

from .arch import arch_of
from .launch import TensorDescriptor

TMA_MMA = ("wgmma", "tcgen05")      # the arches whose grouped GEMMs take weight tiles by TMA (sm90, sm100)


def weight_descriptors(params, w: Tensor, w_up: Optional[Tensor], interleaved: bool) -> tuple:
    """``(W_DESC, w, w_up)``: the weights as TMA tensor descriptors of ``[1, BLOCK_N, BLOCK_K]`` blocks over
    ``[E, N, K]`` (W_DESC 1: K contiguous, an ``nn.Linear``'s layout) or of ``[1, BLOCK_K, BLOCK_N]`` over ``[E,
    K, N]`` (2: N contiguous, a stacked ``[E, in, out]`` parameter), when ``params.tma`` asks (None: as the
    ``MOEC_TMA`` switch says, and unset, on sm90 / sm100 devices) and both weights' layouts allow (16-byte
    aligned base and strides, 16-byte block rows; not GPT-OSS's interleaved gate/up); else ``(0, w, w_up)``,
    pointer loads. Only 16-bit weights (fp32 ones would need a staging buffer the tile's shared memory budget
    does not hold), and on a GPU only one with TMA (elsewhere descriptors compile to scalar loads); the
    interpreter honours the request (tests)."""
    want = params.tma if params.tma is not None else env.switch("MOEC_TMA")
    if want is None or w.device.type == "cuda":     # the device decides, unless asked not to
        want = want is not False and arch_of(w.device).mma in TMA_MMA
    if not want or interleaved or TensorDescriptor is None or w.element_size() != 2:
        return 0, w, w_up
    tile, got = params.tile, []
    for t in (w, w_up) if w_up is not None else (w,):
        if t.stride(2) == 1:
            mode, view, block = 1, t, [1, tile.block_n, tile.block_k]
        elif t.stride(1) == 1:
            mode, view, block = 2, t.transpose(1, 2), [1, tile.block_k, tile.block_n]
        else:
            return 0, w, w_up
        size = t.element_size()
        if (t.data_ptr() % 16 or any(s * size % 16 for s in view.stride()[:-1]) or block[-1] * size < 16
                or (got and got[0][0] != mode)):
            return 0, w, w_up
        got.append((mode, TensorDescriptor.from_tensor(view, block)))
    return got[0][0], got[0][1], got[1][1] if len(got) > 1 else None
