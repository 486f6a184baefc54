"""Argument checks of the functional ops (`moec.ops.moe`, `moec.ops.moba_attention`), made before any
kernel runs: every tensor is a tensor, of a floating dtype, on the input's device (meta only when the
input is, as in a fake or meta call), of the shape its role needs; integer options are ints (not
floats to be truncated, nor bools); argument sets are complete. A violation is a `TypeError` (wrong
kind) or `ValueError` (wrong value) whose message starts with the argument's name and says what was
expected. MoBA's ``cu_seqlens`` is read on the host and must rise from 0 to N: its values decide
which memory the kernels touch (under CUDA graph capture, where it cannot be read, the kernels'
launchers clamp it instead).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, x: Optional[Tensor] = None, *, dtype_of_x: bool = True, dims: Optional[int] = None,
           ref: str = "x"):
    """``t`` is a floating tensor (on ``x``'s device, of ``x``'s dtype unless not ``dtype_of_x``);
    ``ref`` names ``x`` in the messages."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {list(t.shape)}")
    if x is not None:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, {ref} on {x.device}: every tensor must be on one device")
        if dtype_of_x and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, {ref} {x.dtype}: they must have one dtype")


def shape(name: str, t: Optional[Tensor], want: tuple, what: str = "") -> None:
    if t is not None and tuple(t.shape) != tuple(want):
        raise ValueError(f"{name} must have shape {list(want)}{what}, got {list(t.shape)}")


def integer(name: str, v, lo: int = 1, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def number(name: str, v, *, positive: bool = False, optional: bool = False) -> Optional[float]:
    if optional and v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise (TypeError if not isinstance(v, (int, float)) else ValueError)(
            f"{name} must be a {'positive ' if positive else ''}finite number, got {v!r}")
    return float(v)


def choice(name: str, v, allowed) -> str:
    if v not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")
    return v


def moe_args(x, w_router, w_up, w_down, w_gate, tensors: dict) -> tuple[int, int, int]:
    """Check `moec.ops.moe`'s tensors; returns ``(E, f, d)``. ``tensors``: the optional ones by name."""
    tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must be [..., d], got a scalar")
    tensor("w_router", w_router, x, dims=2)
    tensor("w_up", w_up, x, dims=3)
    E, f, d = w_up.shape
    shape("w_router", w_router, (E, d), " ([num_experts, hidden]; w_up is [E, f, d])")
    if x.shape[-1] != d:
        raise ValueError(f"x must have hidden size {d} on its last dim (w_up is {list(w_up.shape)}), "
                         f"got shape {list(x.shape)}")
    tensor("w_down", w_down, x)
    shape("w_down", w_down, (E, d, f), " ([E, d, f] for w_up [E, f, d])")
    if w_gate is not None:
        tensor("w_gate", w_gate, x)
        shape("w_gate", w_gate, (E, f, d), " (like w_up)")
    for name, t in tensors.items():
        if t is not None:
            tensor(name, t, x, dtype_of_x=name != "score_bias")
    shape("b_router", tensors["b_router"], (E,))
    shape("score_bias", tensors["score_bias"], (E,))
    shared = {n: tensors[n] for n in ("shared_up", "shared_down", "shared_gate", "shared_gate_proj")}
    if shared["shared_up"] is None:
        extra = [n for n, t in shared.items() if t is not None]
        if extra:
            raise ValueError(f"{extra[0]} is given without shared_up: the shared expert needs shared_up and "
                             f"shared_down")
    else:
        fs = shared["shared_up"].shape[0]
        shape("shared_up", shared["shared_up"], (fs, d), " ([shared width, hidden])")
        if shared["shared_down"] is None:
            raise ValueError("shared_down must be given with shared_up (the shared expert's down projection)")
        shape("shared_down", shared["shared_down"], (d, fs), " ([hidden, shared width] for shared_up)")
        if w_gate is not None and shared["shared_gate"] is None:
            raise ValueError("shared_gate must be given with shared_up when the experts are gated (w_gate): "
                             "the shared expert is gated like them")
        if w_gate is None and shared["shared_gate"] is not None:
            raise ValueError("shared_gate is given but the experts are not gated (no w_gate)")
        shape("shared_gate", shared["shared_gate"], (fs, d), " (like shared_up)")
        shape("shared_gate_proj", shared["shared_gate_proj"], (1, d), " (the shared expert's sigmoid gate)")
    return E, f, d


def moba_args(q, k, v, cu_seqlens, kconv_weight, block_size, top_k, causal, read_values: bool = True) -> None:
    """Check `moec.ops.moba_attention`'s arguments, ``cu_seqlens``'s values included when
    ``read_values`` (see above; a fake call has none)."""
    integer("block_size", block_size, hi=2**31 - 1)          # kernel arguments are int32
    integer("top_k", top_k, hi=2**16)                         # slots per query: a register tile in the kernels
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    tensor("q", q, dims=4)
    tensor("k", k, q, dims=4, ref="q")
    tensor("v", v, q, dims=4, ref="q")
    B, H, N, D = q.shape
    Hkv = k.shape[1]
    shape("k", k, (B, Hkv, N, D), f" ([B, kv heads, N, D] for q {list(q.shape)})")
    shape("v", v, tuple(k.shape), " (like k)")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k has {Hkv} heads: q's {H} heads must be a multiple of them")
    if kconv_weight is not None:
        tensor("kconv_weight", kconv_weight, q, dtype_of_x=False, dims=3, ref="q")
        if tuple(kconv_weight.shape[:2]) != (Hkv, D) or kconv_weight.shape[2] < 1:
            raise ValueError(f"kconv_weight must be [Hkv={Hkv}, D={D}, kc >= 1], got {list(kconv_weight.shape)}")
    if cu_seqlens is not None:
        cu_seqlens_values(cu_seqlens, q, read_values)


def cu_seqlens_values(cu: Tensor, q: Tensor, read_values: bool = True) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [S+1] of sequence starts and N, got "
                         f"{cu.dtype} of shape {list(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu.device}, q on {q.device}: every tensor must be on one device")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences along N: q must have batch 1, got {q.shape[0]}")
    if (not read_values or q.device.type == "meta" or torch.compiler.is_compiling()
            or (q.is_cuda and torch.cuda.is_current_stream_capturing())):
        return                                      # values cannot be read (a trace, a capture); the launchers clamp them
    N = q.shape[2]
    values = cu.tolist()
    if values[0] != 0 or values[-1] != N or any(a > b for a, b in zip(values, values[1:])):
        shown = values if len(values) <= 12 else values[:6] + ["..."] + values[-6:]
        raise ValueError(f"cu_seqlens must rise from 0 to N={N} (non-decreasing), got {shown}")
