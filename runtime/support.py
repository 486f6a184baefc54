"""Whether the generated kernels can serve a call: the one check every entry point makes (compiled
modules, `moec.ops`, transformers' experts interface) before it runs kernels or the eager code."""
from __future__ import annotations

from typing import Iterable, Optional

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def why_not_kernels(x: torch.Tensor, others: Iterable[torch.Tensor] = (), *, fp32_ok: bool = False) -> Optional[str]:
    """Why the kernels cannot take input ``x`` with tensors ``others`` (None: they can). ``others`` must
    be on ``x``'s device and of its dtype (``fp32_ok``: or float32, which the kernels read as such)."""
    if not isinstance(x, torch.Tensor):
        return f"input is {type(x).__name__}, not a tensor"
    if x.dtype not in KERNEL_DTYPES:
        return f"input dtype {x.dtype} (kernels take float32, float16, bfloat16)"
    if x.device.type not in ("cpu", "cuda"):
        return f"input on device {x.device}"
    for t in others:
        if t.device != x.device:
            return f"weights on {t.device}, input on {x.device}"
        if t.is_floating_point() and t.dtype != x.dtype and not (fp32_ok and t.dtype == torch.float32):
            return f"weights in {t.dtype}, input in {x.dtype}"
    if x.device.type == "cpu" and x.dtype == torch.bfloat16:
        return "bfloat16 on CPU (the Triton interpreter computes bf16 dots wrongly)"
    return None
