"""MoBA attention in a Hugging Face transformers model: ``attn_implementation="moec_moba"``.

    pip install "transformers>=5"      # optional dependency of moec
    python examples/hf_moba.py

Every attention layer of the model attends with Mixture-of-Block-Attention: each query reads its
own key block (causally) and the ``moba_topk - 1`` best-scoring past blocks of ``moba_block_size``
keys. The prompt (prefill) runs moec's MoBA kernels; each generated token attends against the KV
cache. The script checks generation against the same model run without a cache (every step a
whole-sequence MoBA, `moec.moba.moba_reference`).
"""
import copy
import sys

import torch

try:
    from transformers import AutoModelForCausalLM, Qwen3Config
except ImportError:
    print("transformers is not installed (pip install 'transformers>=5'); nothing to show")
    sys.exit(0)

import moec.hf

moec.hf.register()                      # "moec_moba" joins transformers' attention implementations

config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.1)
config.moba_block_size, config.moba_topk = 8, 2          # small blocks so that a short prompt has several
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="moec_moba").eval()
no_cache = copy.deepcopy(model)

prompt = torch.randint(1, config.vocab_size, (1, 29))
with torch.no_grad():
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    ref = no_cache.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
print("generated (KV cache):   ", out[0, prompt.shape[1]:].tolist())
print("generated (whole MoBA): ", ref[0, prompt.shape[1]:].tolist())
assert torch.equal(out, ref)
