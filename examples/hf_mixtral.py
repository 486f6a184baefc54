"""A small Hugging Face transformers Mixtral model (random weights, no download), compiled by moec.

    pip install "transformers>=5"      # optional dependency of moec
    python examples/hf_mixtral.py [--dump DIR]

`moec.compile` lifts each MixtralSparseMoeBlock (router, experts, combine) into moec's kernels;
the model is otherwise untouched, so `generate()` works as usual. The script checks logits and
greedy generation against eager transformers, dumps the generated kernels, runs the other integration,
`experts_implementation="moec"` (transformers' router, moec's experts), and finally compiles a PhiMoE model,
whose sparsemixer routing moec does not compute: its blocks stay eager, explain() says why, and their experts
modules run on moec's kernels all the same.
"""
import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

import moec

try:
    from transformers import AutoModelForCausalLM, MixtralConfig
except ImportError:
    print("transformers is not installed (pip install 'transformers>=5'); nothing to show")
    sys.exit(0)

import moec.hf

parser = argparse.ArgumentParser()
parser.add_argument("--dump", default=None, help="directory for the IR and kernels (default: a temporary one, "
                                                  "removed at exit)")
args = parser.parse_args()
scratch = tempfile.TemporaryDirectory(prefix="moec_hf_")          # removed when the script ends
dump = Path(args.dump or scratch.name)

config = MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                       max_position_embeddings=128, initializer_range=0.1, pad_token_id=0)
torch.manual_seed(0)
eager = AutoModelForCausalLM.from_config(config).eval()
model = moec.compile(copy.deepcopy(eager), dump_dir=dump)        # in place; returns the same model

prompt = torch.randint(3, config.vocab_size, (1, 6))
with torch.no_grad():
    logits, ref = model(prompt).logits, eager(prompt).logits
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out_ref = eager.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
print(model.explain())
print("max |moec - eager| logits:", (logits - ref).abs().max().item())
print("generated (moec): ", out[0].tolist())
print("generated (eager):", out_ref[0].tolist())
assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4)
assert out.tolist() == out_ref.tolist()
kernels = sorted(p.relative_to(dump) for p in dump.rglob("kernels/*.py"))
print(f"kernels dumped under {dump}:", *kernels, sep="\n  ")
assert kernels

# transformers' own router, moec's fused experts: experts_implementation="moec"
moec.hf.register()
torch.manual_seed(0)
fused = AutoModelForCausalLM.from_config(config, experts_implementation="moec").eval()
with torch.no_grad():
    y = fused(prompt).logits
print("experts_implementation='moec': max |moec - eager| logits:", (y - ref).abs().max().item(),
      "| experts calls:", dict(moec.hf.calls(fused)))
assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)

# a block whose routing moec does not compute (PhiMoE's sparsemixer): the routing as written, the experts on kernels
from transformers import PhimoeConfig  # noqa: E402

phi = PhimoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
torch.manual_seed(0)
phi_eager = AutoModelForCausalLM.from_config(phi).eval()
phi_model = moec.compile(copy.deepcopy(phi_eager))
with torch.no_grad():
    got, want = phi_model(prompt).logits, phi_eager(prompt).logits
print("\n".join(line for line in phi_model.explain().splitlines() if "EAGER" in line or "EXPERTS" in line))
print("PhiMoE: max |moec - eager| logits:", (got - want).abs().max().item())
assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
assert "EXPERTS" in phi_model.explain()
