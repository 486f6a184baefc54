"""Bad arguments to the public ops (`moec.ops.moe`, `moec.ops.moba_attention`): each gives an error
naming the argument and what was expected, before any kernel runs, or the eager answer; never a crash,
never uninitialised memory, never a kernel reading outside the tensors.

The fuzz test throws random invalid arguments at every public op in a subprocess (a crash there
fails the test instead of the test run)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moec
from moec.moba import moba_reference
from moec.runtime.launch import recording

E, F, D = 4, 16, 8


def moe_weights(**extra):
    g = torch.Generator().manual_seed(0)
    w = dict(w_router=torch.randn(E, D, generator=g), w_up=torch.randn(E, F, D, generator=g) * 0.2,
             w_down=torch.randn(E, D, F, generator=g) * 0.2, w_gate=torch.randn(E, F, D, generator=g) * 0.2)
    w.update(extra)
    return w


def raises(kind, match, fn):
    with recording() as launches, pytest.raises(kind, match=match):
        fn()
    assert not launches, "a kernel ran before the argument was checked"


X = torch.randn(3, D)


@pytest.mark.parametrize("case", ["router", "up", "down", "gate"])
def test_moe_weight_on_meta_beside_a_real_input(case):
    name = {"router": "w_router", "up": "w_up", "down": "w_down", "gate": "w_gate"}[case]
    w = moe_weights()
    w[name] = w[name].to("meta")
    raises(ValueError, f"{name} is on meta, x on cpu: every tensor must be on one device",
           lambda: moec.ops.moe(X, **w, top_k=2))


def test_moe_all_meta_is_a_shape_only_call():
    w = {k: v.to("meta") for k, v in moe_weights().items()}
    y = moec.ops.moe(X.to("meta"), **w, top_k=2)
    assert y.device.type == "meta" and y.shape == X.shape


def test_moe_integer_input_and_mixed_dtypes():
    raises(TypeError, "x must be a floating-point tensor .* got torch.int64",
           lambda: moec.ops.moe(X.long(), **moe_weights(), top_k=2))
    raises(TypeError, "w_up has dtype torch.float16, x torch.float32: they must have one dtype",
           lambda: moec.ops.moe(X, **moe_weights(w_up=moe_weights()["w_up"].half()), top_k=2))


@pytest.mark.parametrize("name, value, kind", [("top_k", 2.7, TypeError), ("top_k", True, TypeError),
                                               ("top_k", 0, ValueError), ("n_group", 1.5, TypeError),
                                               ("routed_scaling", float("nan"), ValueError),
                                               ("glu_limit", -1.0, ValueError), ("score", "softplus", ValueError),
                                               ("renormalize", 1, TypeError)])
def test_moe_options(name, value, kind):
    opts = {"top_k": 2, name: value}
    raises(kind, name, lambda: moec.ops.moe(X, **moe_weights(), **opts))


def test_moe_shared_expert_argument_sets():
    g = torch.Generator().manual_seed(1)
    up, down, gate = torch.randn(6, D, generator=g), torch.randn(D, 6, generator=g), torch.randn(6, D, generator=g)
    raises(ValueError, "shared_down is given without shared_up",
           lambda: moec.ops.moe(X, **moe_weights(), top_k=2, shared_down=down))
    raises(ValueError, "shared_gate is given without shared_up",
           lambda: moec.ops.moe(X, **moe_weights(), top_k=2, shared_gate=gate))
    raises(ValueError, "shared_gate must be given with shared_up when the experts are gated",
           lambda: moec.ops.moe(X, **moe_weights(), top_k=2, shared_up=up, shared_down=down))
    raises(ValueError, "shared_down must be given with shared_up",
           lambda: moec.ops.moe(X, **moe_weights(), top_k=2, shared_up=up, shared_gate=gate))
    ungated = {k: v for k, v in moe_weights().items() if k != "w_gate"}
    raises(ValueError, "shared_gate is given but the experts are not gated",
           lambda: moec.ops.moe(X, **ungated, top_k=2, shared_up=up, shared_down=down, shared_gate=gate))
    y = moec.ops.moe(X, **moe_weights(), top_k=2, shared_up=up, shared_down=down, shared_gate=gate)
    ref = moec.ops.moe_reference(X, **moe_weights(), top_k=2, shared_up=up, shared_down=down, shared_gate=gate)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


Q = torch.randn(1, 2, 48, 16)


@pytest.mark.parametrize("cu", [[0, 20, 60], [0, -5, 48], [0, 40, 8, 48], [1, 48], [0, 47]])
def test_moba_cu_seqlens_values(cu):
    raises(ValueError, r"cu_seqlens must rise from 0 to N=48 \(non-decreasing\)",
           lambda: moec.ops.moba_attention(Q, Q, Q, block_size=16, top_k=2,
                                           cu_seqlens=torch.tensor(cu, dtype=torch.int32)))


@pytest.mark.parametrize("name", ["k", "v", "kconv_weight", "cu_seqlens"])
def test_moba_tensor_on_meta(name):
    args = dict(k=Q, v=Q, kconv_weight=torch.randn(2, 16, 3), cu_seqlens=torch.tensor([0, 48], dtype=torch.int32))
    args[name] = args[name].to("meta")
    raises(ValueError, f"{name} is on meta, q on cpu: every tensor must be on one device",
           lambda: moec.ops.moba_attention(Q, args["k"], args["v"], block_size=16, top_k=2,
                                           kconv_weight=args["kconv_weight"], cu_seqlens=args["cu_seqlens"]))


@pytest.mark.parametrize("name, value", [("block_size", 16.5), ("top_k", 2.7), ("block_size", 0), ("top_k", False)])
def test_moba_integer_options(name, value):
    opts = {"block_size": 16, "top_k": 2, name: value}
    raises((TypeError, ValueError), name, lambda: moec.ops.moba_attention(Q, Q, Q, **opts))


def test_launchers_clamp_cu_seqlens_they_cannot_check():
    """Under CUDA graph capture the op cannot read cu_seqlens; the launchers bound it themselves, so
    even values the op would refuse keep every kernel inside its tensors (run in a subprocess: an
    out-of-bounds read there would crash it)."""
    code = """
        import torch
        from moec.ops import moba_forward_kernels
        from moec import ops_args
        ops_args.cu_seqlens_values = lambda *a, **k: None          # as under capture: values unread
        q = torch.randn(1, 2, 48, 16)
        for cu in ([0, 20, 6000], [0, -500, 48], [0, 40, 8, 48], [7, 9], [0, 2**30]):
            for scheme in ("rows", "densify"):
                out, lse, idx = moba_forward_kernels(q, q, q, block_size=16, top_k=3, scheme=scheme,
                                                     cu_seqlens=torch.tensor(cu, dtype=torch.int32))
                assert out.shape == q.shape and idx.shape == (1, 2, 48, 3)
        print("ok")
    """
    got = _subprocess(code)
    assert got.returncode == 0 and got.stdout.strip().endswith("ok"), got.stderr[-2000:]


def _subprocess(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_fuzz_invalid_arguments_in_a_subprocess():
    """Random mixes of wrong dtypes, devices, shapes, option types and values, missing or partial
    argument sets: each call gives the eager reference's answer (kernels or not) or a TypeError /
    ValueError that names the argument."""
    got = _subprocess(f"""
        import os
        from op_fuzz import run
        run(examples={int(os.environ.get("MOEC_FUZZ_EXAMPLES", "60"))})
        print("ok")
    """)
    assert got.returncode == 0 and got.stdout.strip().endswith("ok"), (got.stdout[-2000:], got.stderr[-4000:])
