"""Read what moec generates for a layer, without any model: spec -> IR -> passes -> kernels.

    python examples/inspect_pipeline.py                 # IR after every pass, then one kernel
    MOEC_PRINT_AFTER=fold-combine python examples/inspect_pipeline.py

`moec.compiler.compile_spec` is what `moec.compile` runs for each lifted region.
"""
import torch

from moec.compiler import compile_spec
from moec.ir.build import moe_inputs
from moec.reference import moe
from moec.runtime.arch import ARCHS
from moec.spec import MoESpec, MoEWeights, RouterConfig

spec = MoESpec(hidden=64, ffn=128, router=RouterConfig(num_experts=8, top_k=2, order="topk_then_score"))
compiled = compile_spec(spec, torch.float16, ("y",), ARCHS["sm90"])    # tiles chosen for an H100
for name, text in compiled.stages:
    print(f"// ---- after {name}\n{text}")
step, kernel = compiled.program.kernels()[1]
print(f"// ---- generated kernel for %{step.node.name} ({len(kernel.source.splitlines())} lines)")
print("\n".join(kernel.source.splitlines()[:20]), "\n...")

# The program runs anywhere: here on the CPU through the Triton interpreter, in fp16.
torch.manual_seed(0)
w = MoEWeights(w_router=torch.randn(8, 64).half(), w_gate=(torch.randn(8, 128, 64) * 0.1).half(),
               w_up=(torch.randn(8, 128, 64) * 0.1).half(), w_down=(torch.randn(8, 64, 128) * 0.1).half())
x = torch.randn(5, 64).half()
(y,) = compiled.program.run(moe_inputs(x, w))
print("max |kernels - reference|:", (y.float() - moe(x, w, spec)[0].float()).abs().max().item())
