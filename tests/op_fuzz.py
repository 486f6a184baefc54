"""Invalid-argument fuzzing of moec's public ops, run by tests/test_op_arguments.py in a subprocess.

Each example starts from a valid call and breaks it in one or two ways (a dtype, a device, a shape, a
missing or extra tensor, an option of the wrong type or out of range). The op must then either give
what its eager reference gives for the same arguments, or raise a TypeError / ValueError whose
message names one of the call's arguments. Anything else (another exception, a crash, garbage) fails.
"""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moec
from moec.moba import moba_reference

E, F, D, FS = 4, 8, 8, 6
MOE_TENSORS = ("x", "w_router", "w_up", "w_down", "w_gate", "b_router", "score_bias", "shared_up", "shared_down",
               "shared_gate", "shared_gate_proj", "b_gate", "b_up", "b_down")
MOE_OPTIONS = {"top_k": 2, "score": "softmax", "renormalize": False, "routed_scaling": 1.0, "n_group": 1,
               "topk_group": 1, "group_score": "max", "activation": "silu", "act_alpha": 1.0, "glu_limit": None,
               "up_shift": 0.0}
MOBA_TENSORS = ("q", "k", "v", "cu_seqlens", "kconv_weight")
MOBA_OPTIONS = {"block_size": 8, "top_k": 2, "causal": True, "scheme": "auto"}
WRONG_VALUES = [2.5, -1, 0, True, "x", None, float("nan"), 10**12]


def _moe_valid(g: torch.Generator, shared: bool, biases: bool) -> dict:
    t = dict(x=torch.randn(5, D, generator=g), w_router=torch.randn(E, D, generator=g),
             w_up=torch.randn(E, F, D, generator=g) * 0.3, w_down=torch.randn(E, D, F, generator=g) * 0.3,
             w_gate=torch.randn(E, F, D, generator=g) * 0.3)
    if shared:
        t.update(shared_up=torch.randn(FS, D, generator=g) * 0.3, shared_down=torch.randn(D, FS, generator=g) * 0.3,
                 shared_gate=torch.randn(FS, D, generator=g) * 0.3)
    if biases:
        t.update(b_gate=torch.randn(E, F, generator=g), b_up=torch.randn(E, F, generator=g),
                 b_down=torch.randn(E, D, generator=g))
    return t


def _break_tensor(t: dict, name: str, how: str, g: torch.Generator) -> None:
    v = t.get(name)
    if how == "drop":
        t[name] = None
    elif how == "add" and v is None:
        t[name] = torch.randn(3, D, generator=g)
    elif not isinstance(v, torch.Tensor) or v.device.type == "meta":
        return                              # already broken beyond what this can change
    elif how == "int":
        t[name] = v.long()
    elif how == "half":
        t[name] = v.half()
    elif how == "double":
        t[name] = v.double()
    elif how == "meta":
        t[name] = v.to("meta")
    elif how == "shape":
        t[name] = v[..., :-1] if v.dim() and v.shape[-1] > 1 else v.unsqueeze(0)
    elif how == "rank":
        t[name] = v.unsqueeze(0)
    elif how == "list":
        t[name] = v.tolist()


HOWS = ["drop", "add", "int", "half", "double", "meta", "shape", "rank", "list"]


@st.composite
def moe_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    t = _moe_valid(g, draw(st.booleans()), draw(st.booleans()))
    opts = dict(MOE_OPTIONS)
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            _break_tensor(t, draw(st.sampled_from(MOE_TENSORS)), draw(st.sampled_from(HOWS)), g)
        else:
            opts[draw(st.sampled_from(sorted(MOE_OPTIONS)))] = draw(st.sampled_from(WRONG_VALUES))
    return t, opts


@st.composite
def moba_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    N = draw(st.integers(1, 40))
    t = dict(q=torch.randn(1, 2, N, 16, generator=g), k=torch.randn(1, 1, N, 16, generator=g),
             v=torch.randn(1, 1, N, 16, generator=g))
    if draw(st.booleans()):
        cut = sorted(draw(st.lists(st.integers(-3, N + 3), max_size=3)))
        t["cu_seqlens"] = torch.tensor([0] + cut + [N], dtype=torch.int32)
    if draw(st.booleans()):
        t["kconv_weight"] = torch.randn(1, 16, 3, generator=g)
    opts = dict(MOBA_OPTIONS)
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            _break_tensor(t, draw(st.sampled_from(MOBA_TENSORS)), draw(st.sampled_from(HOWS)), g)
        else:
            opts[draw(st.sampled_from(sorted(MOBA_OPTIONS)))] = draw(st.sampled_from(WRONG_VALUES + ["rows", 3]))
    return t, opts


def _names_an_argument(e: Exception, names) -> bool:
    msg = str(e)
    return any(n in msg for n in names)


def _close(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    if a.device.type == "meta":
        return True
    a, b = a.double(), b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool((both_nan | torch.isclose(a, b, rtol=2e-2, atol=2e-2)).all())


def _judge(op, reference, names, t, opts) -> None:
    try:
        got = op(**t, **opts)
    except (TypeError, ValueError) as e:
        assert _names_an_argument(e, names), f"error names no argument: {type(e).__name__}: {e}"
        return
    try:
        want = reference(**t, **opts)
    except (TypeError, ValueError, RuntimeError, NotImplementedError, IndexError) as e:
        raise AssertionError(f"the op accepted arguments its reference refuses ({type(e).__name__}: {e}): "
                             f"{_describe(t, opts)}") from None
    assert _close(got, want), f"the op's answer differs from the reference's: {_describe(t, opts)}"


def _describe(t, opts) -> str:
    shown = {k: (f"{v.dtype} {list(v.shape)} {v.device}" if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    return f"{shown} {opts}"


def _moe_reference(**kw):
    x = kw.pop("x")
    return moec.ops.moe_reference(x, kw.pop("w_router"), kw.pop("w_up"), kw.pop("w_down"), kw.pop("w_gate", None),
                                  **{k: v for k, v in kw.items() if v is not None or k not in MOE_TENSORS})


def _moba_op(q, k, v, cu_seqlens=None, kconv_weight=None, **opts):
    return moec.ops.moba_attention(q, k, v, cu_seqlens=cu_seqlens, kconv_weight=kconv_weight, **opts)


def _moba_reference(q, k, v, cu_seqlens=None, kconv_weight=None, scheme="auto", **opts):
    if scheme not in ("auto", "rows", "densify"):
        raise ValueError(f"scheme {scheme!r}")
    for name in ("block_size", "top_k"):
        if isinstance(opts[name], bool) or not isinstance(opts[name], int):
            raise TypeError(name)
    if not isinstance(opts["causal"], bool):
        raise TypeError("causal")
    return moba_reference(q, k, v, cu_seqlens=cu_seqlens, kconv_weight=kconv_weight, **opts)[0]


def run(examples: int = 60) -> None:
    config = settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))

    @config
    @given(moe_calls())
    def fuzz_moe(call):
        t, opts = call
        _judge(moec.ops.moe, _moe_reference, list(MOE_TENSORS) + list(MOE_OPTIONS), t, opts)

    @config
    @given(moba_calls())
    def fuzz_moba(call):
        t, opts = call
        _judge(_moba_op, _moba_reference, list(MOBA_TENSORS) + list(MOBA_OPTIONS), t, opts)

    fuzz_moe()
    fuzz_moba()
