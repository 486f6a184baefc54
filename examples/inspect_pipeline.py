"""Read what moec generates, without any model: recipe -> IR -> passes -> kernels, for an MoE layer
and for a MoBA core.

    python examples/inspect_pipeline.py                 # IR after every pass, then one kernel
    MOEC_PRINT_AFTER=fold-combine python examples/inspect_pipeline.py

`moec.compiler.compile_program` is the one compile path: what `moec.compile` runs for each lifted
region, `moec.ops` for each call's configuration and transformers' experts interface for its experts.
"""
import torch

from moec.compiler import MobaRecipe, compile_program, compile_spec
from moec.ir.build import moe_inputs
from moec.moba import MobaConfig, moba_reference
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

# A MoBA core through the same driver: block size 16, top-3 blocks, 4 query heads over 2 kv heads.
moba = compile_program(MobaRecipe(MobaConfig(block_size=16, top_k=3, heads=4, kv_heads=2, head_dim=32)),
                       torch.float32, ARCHS["sm90"])
print(f"// ---- MoBA after {moba.stages[-1][0]}\n{moba.stages[-1][1]}")     # both attention schemes, a select
q, k, v = torch.randn(1, 4, 100, 32), torch.randn(1, 2, 100, 32), torch.randn(1, 2, 100, 32)
(out,) = moba.program.run({"q": q, "k": k, "v": v})
print("max |MoBA kernels - reference|:", (out - moba_reference(q, k, v, block_size=16, top_k=3)[0]).abs().max().item())
