"""Every kernel of an MoE layer's generated backward (`moec.ir.backward`), at the tiles chosen for each GPU
arch, compiles ahead of time for that arch (fp16 as recorded and bf16, the GPU dtype), fits its shared
memory, and uses the arch's tensor-core instructions: the backward's grouped GEMMs take 64-row tiles,
so sm90 gets wgmma and sm100 tcgen05.

The forward and backward programs are compiled with ``arch=sm80/sm90/sm100`` and run on the CPU under
the interpreter in fp16 to record their launches; each distinct launch is compiled with
``triton.compile(target=GPUTarget)``.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from aot_util import aot_archs, distinct_launches, record_launches, retyped
from moec.compiler import BackwardRecipe, ExpertsRecipe, MoERecipe, compile_program
from moec.ir.backward import PRE_SAVED, saved_values
from moec.ir.build import moe_inputs
from moec.runtime.aot import compile_launch
from moec.runtime.arch import ARCHS
from moec.runtime.dispatch import dispatch
from moec.spec import MoESpec, MoEWeights, RouterConfig, SharedExpertConfig

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

SPEC = MoESpec(64, 96, RouterConfig(8, 2, aux_loss=True), shared=SharedExpertConfig(64, gated=True),
               expert_bias=True)
EXPERTS = ExpertsRecipe(8, 2, 64, 96, "gelu", False)
MMA = {"sm80": "mma.sync", "sm90": "wgmma", "sm100": "tcgen05"}
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "large"
DTYPES = ("bf16", "fp16") if LARGE else ("bf16",)
TOKENS = (40, 300, 1100) if LARGE else (40,)


def _weights(g) -> MoEWeights:
    E, d, f, fs = 8, 64, 96, 64

    def rnd(*s):
        return (torch.randn(*s, generator=g) / s[-1] ** 0.5).half()
    return MoEWeights(w_router=rnd(E, d), w_gate=rnd(E, f, d), w_up=rnd(E, f, d), w_down=rnd(E, d, f),
                      b_gate=rnd(E, f), b_up=rnd(E, f), b_down=rnd(E, d), shared_up=rnd(fs, d),
                      shared_gate=rnd(fs, d), shared_down=rnd(d, fs), shared_gate_proj=rnd(1, d))


def _backward_launches(arch: str, T: int = 40) -> list:
    """The distinct launches of the backward programs (and a saving training forward) at ``T`` tokens."""
    g = torch.Generator().manual_seed(0)
    recipe = MoERecipe(SPEC, ("y", "aux"))
    fwd = compile_program(recipe, torch.float16, ARCHS[arch])
    bwd = compile_program(BackwardRecipe(recipe), torch.float16, ARCHS[arch])
    x, w = torch.randn(T, 64, generator=g).half(), _weights(g)
    env = fwd.program.run(moe_inputs(x, w), values=True)
    inputs = {**moe_inputs(x, w), **{r: env[v] for r, v in saved_values(fwd.graph).items()},
              "dy": torch.randn(T, 64, generator=g).half(), "d_aux": torch.tensor(1.0)}
    names = {n for n, _ in bwd.graph.inputs}
    records = record_launches(lambda: bwd.program.run({n: v for n, v in inputs.items() if n in names}))
    # the routed experts alone (transformers' experts interface): ungated GELU experts
    ebwd = compile_program(BackwardRecipe(EXPERTS), torch.float16, ARCHS[arch])
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)]).int()
    order, offsets = dispatch(ids, 8)
    einputs = {"dy": torch.randn(T, 64, generator=g).half(), "x": x, "w_up": w.w_up, "w_down": w.w_down,
               "ids": ids, "route_weights": torch.rand(T, 2, generator=g), "order": order, "offsets": offsets}
    records += record_launches(lambda: ebwd.program.run(einputs))
    # a training forward that saves the gate/up products (its fused GEMMs store pre / pre_up) and the backward
    # that reads them
    train = compile_program(MoERecipe(SPEC, ("y", "aux"), saving="save"), torch.float16, ARCHS[arch])
    records += record_launches(lambda: train.program.run(moe_inputs(x, w)))
    env = train.program.run(moe_inputs(x, w), values=True)
    saved = {r: env[v] for r, v in saved_values(train.graph).items()}
    sbwd = compile_program(BackwardRecipe(recipe, tuple(r for r in PRE_SAVED if r in saved)), torch.float16,
                           ARCHS[arch])
    inputs.update(saved)
    names = {n for n, _ in sbwd.graph.inputs}
    records += record_launches(lambda: sbwd.program.run({n: v for n, v in inputs.items() if n in names}))
    # experts whose input the routing weight scales (Llama 4): the scale on the gate/up accumulators, forward
    # and in the backward's activation epilogue
    scaled = MoERecipe(MoESpec(64, 96, RouterConfig(8, 1, score="sigmoid"), input_scaled=True), ("y",))
    ws = MoEWeights(w_router=w.w_router, w_gate=w.w_gate, w_up=w.w_up, w_down=w.w_down)
    sfwd = compile_program(scaled, torch.float16, ARCHS[arch])
    records += record_launches(lambda: sfwd.program.run(moe_inputs(x, ws)))
    env = sfwd.program.run(moe_inputs(x, ws), values=True)
    sb = compile_program(BackwardRecipe(scaled), torch.float16, ARCHS[arch])
    sin = {**moe_inputs(x, ws), **{r: env[v] for r, v in saved_values(sfwd.graph).items()}, "dy": inputs["dy"]}
    names = {n for n, _ in sb.graph.inputs}
    records += record_launches(lambda: sb.program.run({n: v for n, v in sin.items() if n in names}))
    return distinct_launches(records)


@pytest.mark.parametrize("arch", aot_archs("sm90"))
def test_backward_kernels_compile_fit_and_use_tensor_cores(arch):
    """bf16, the GPU dtype (recorded in fp16: the interpreter gets bf16 tl.dot wrong); fp16 as recorded too
    under ``HYPOTHESIS_PROFILE=large``. The cost model tiles the backward per token-count bucket: T = 40 runs the
    kernels of its bucket, T = 300 and 1100 those of the larger ones under the large profile (the interpreter
    takes a while; tests/test_cost_model.py compiles every bucket's backward kernel at real sizes by default)."""
    launches = distinct_launches([r for T in TOKENS for r in _backward_launches(arch, T)])
    names = {re.sub(r"_T\d+(to\d+|up)$", "", r.kernel.fn_name) for r in launches}
    assert {"grouped_dgrad_gather_silu_glu", "grouped_dgrad_two_scatter", "grouped_wgrad_gather_scaled_dbias",
            "grouped_wgrad_gather_dbias", "grouped_dgrad_silu_glu", "grouped_dgrad_two", "grouped_wgrad_scaled",
            "grouped_dgrad_gather_gelu", "grouped_dgrad_scatter"} <= names, names
    assert {"grouped_gemm_gather_silu_glu_inscaled", "grouped_dgrad_gather_silu_glu_inscaled"} <= names, names
    for stored in ("grouped_gemm_gather_bias_silu_glu_pre", "grouped_gemm_silu_glu_pre"):   # the training forward's
        assert any(n.startswith(stored) for n in names), (stored, names)
    for record in launches:
        for dtype in DTYPES:
            rec = record if dtype == "fp16" else retyped(record, "fp16", "bf16")
            report = compile_launch(rec, arch)
            where = f"{rec.kernel.fn_name} {arch} {dtype}"
            assert report.fits, f"{where}: {report.shared} > {report.smem_limit} bytes of shared memory"
            if rec.kernel.fn_name.startswith(("grouped_dgrad", "grouped_wgrad")):   # wgrad's MMA rows: BLOCK_N
                rows = rec.constexprs["BLOCK_N" if "wgrad" in rec.kernel.fn_name else "BLOCK_M"]
                want = MMA[arch] if rows >= ARCHS[arch].fast_mma_min_m else "mma.sync"
                assert report.mma == want, f"{where}: got {report.mma!r}, want {want!r} for {rows} MMA rows"
