"""Every kernel moec generates for the zoo's layers, with the tiles chosen for each GPU arch,
compiles ahead of time for that arch (bf16, the GPU dtype) and fits its shared memory.

Each layer is lifted from its eager module, compiled with ``arch=sm80/sm90/sm100`` (so the
tiles the cost model chooses for that arch are used), run on the CPU under the interpreter in
fp16 to record its launches, and every distinct launch is compiled with
``triton.compile(target=GPUTarget)`` (with the JIT's argument specializations, so loads are
pipelined and shared memory is what a real launch takes). Tiles are chosen per token-count
bucket: every layer runs at T=8; two (routed GLU experts; groups + shared expert) also run at
T=4 and T=300, and a GPT-OSS layer (biases, clamped SwiGLU, interleaved gate/up views) at T=4 and 300, so the decode bucket's and a mid bucket's kernels are compiled too (the others'
tiles are covered by tests/test_cost_model.py). An MLP router's layer compiles the routing kernel that reads
given logits, Ergo-style expert norms the expert-norm kernel.
"""
from __future__ import annotations

import pytest
import torch

import zoo
from aot_util import aot_archs, distinct_launches, launch_key, record_launches, retyped
from moec.compiler import compile_spec
from moec.frontend import LiftedMoE, lift
from moec.ir.build import moe_inputs
from moec.moe_region import MoERegion
from moec.runtime.aot import compile_launch
from moec.runtime.arch import ARCHS
from moec.spec import MoESpec, MoEWeights, RouterConfig

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")

MODULES = [zoo.MixtralMoE, zoo.StackedGatherBmmMoE, zoo.DenseOneHotMoE, zoo.DeepseekV3MoE, zoo.SwitchMoE,
           zoo.QwenMoE, zoo.AuxLossMoE, zoo.LogitsBiasTopKMoE, zoo.Relu2ExpertMoE, zoo.GatherScaledMoE,
           zoo.MLPRouterMoE, zoo.ExpertNormMoE]
TOKENS = {"MixtralMoE": (4, 8, 300), "DeepseekV3MoE": (4, 8, 300)}     # others: (8,)
# layers with no eager zoo module (their frontend is a Hugging Face adapter): compiled from the spec
GPT_OSS = MoESpec(64, 48, RouterConfig(8, 2, order="topk_then_score", router_bias=True), expert_bias=True,
                  act_alpha=1.702, glu_limit=7.0, up_shift=1.0)


def _gpt_oss_weights(spec: MoESpec) -> MoEWeights:
    """GPT-OSS's layout: gate/up interleaved in one ``[E, d, 2f]`` tensor, biases likewise."""
    E, d, f = spec.num_experts, spec.hidden, spec.ffn
    gu, gub = torch.randn(E, d, 2 * f).half(), torch.randn(E, 2 * f).half()
    return MoEWeights(w_router=torch.randn(E, d).half(), b_router=torch.randn(E).half(),
                      w_gate=gu[..., 0::2].mT, w_up=gu[..., 1::2].mT, w_down=torch.randn(E, f, d).half().mT,
                      b_gate=gub[:, 0::2], b_up=gub[:, 1::2], b_down=torch.randn(E, d).half())


@pytest.fixture(scope="module")
def lifted():
    torch.manual_seed(0)
    out = []
    for cls in MODULES:
        module = cls().eval()
        got = lift(module)
        assert isinstance(got, LiftedMoE), got
        out.append((cls.__name__, module, got))
    return out


@pytest.mark.parametrize("arch", aot_archs("sm80", "sm100"))
def test_zoo_kernels_compile_for_arch(lifted, arch):
    records = []
    for name, module, got in lifted:
        region = MoERegion(name, lifted=got)
        tensors = [t.half() for t in got.param_tensors(module)]
        c = compile_spec(got.spec, torch.float16, region.outputs, ARCHS[arch])
        for T in TOKENS.get(name, (8,)):
            x = torch.randn(T, got.spec.hidden).half()
            # (an external router's logits are an input of the program)
            logits = torch.randn(T, got.spec.num_experts) if got.spec.external_router else None
            records += record_launches(lambda: c.program.run(moe_inputs(x, got.weights(tensors), logits)))
    c = compile_spec(GPT_OSS, torch.float16, ("y", "weights"), ARCHS[arch])
    for T in (4, 300):
        x = torch.randn(T, GPT_OSS.hidden).half()
        records += record_launches(lambda: c.program.run(moe_inputs(x, _gpt_oss_weights(GPT_OSS))))
    seen = set()
    for rec in distinct_launches(retyped(r) for r in records):
        if launch_key(rec) in seen:
            continue
        seen.add(launch_key(rec))
        report = compile_launch(rec, arch)
        assert report.fits, f"{rec.kernel.fn_name} needs {report.shared} B of shared memory on {arch}"
    assert len(seen) >= len(MODULES)
