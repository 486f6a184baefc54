"""Tiny random Hugging Face transformers MoE models, one per family (no downloads: configs in code).

Each has 2 decoder layers, hidden size 32, a handful of experts and a 96-token vocabulary, and a
larger ``initializer_range`` than the default so that the MoE blocks change the logits a lot
(with 0.02 their outputs are ~1e-3 of the residual stream, and a wrong block would hide).
"""
from __future__ import annotations

import functools

import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)


def _configs() -> dict:
    C = transformers
    return {
        "mixtral": lambda: C.MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: C.Qwen2MoeConfig(
            **_COMMON, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
            num_experts=6, num_experts_per_tok=2, norm_topk_prob=False),
        "qwen3_moe": lambda: C.Qwen3MoeConfig(**_COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
                                              num_experts=6, num_experts_per_tok=2, norm_topk_prob=True),
        "deepseek_v3": lambda: C.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
            n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
            routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True, kv_lora_rank=16,
            q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, rope_parameters=None),
        "olmoe": lambda: C.OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=6, num_experts_per_tok=2),
        "gpt_oss": lambda: C.GptOssConfig(**_COMMON, head_dim=8, intermediate_size=24, num_local_experts=4,
                                          num_experts_per_tok=2, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                          layer_types=["sliding_attention", "full_attention"]),
        "granitemoe": lambda: C.GraniteMoeConfig(**_COMMON, intermediate_size=24, num_local_experts=4,
                                                 num_experts_per_tok=2),
        "glm4_moe": lambda: C.Glm4MoeConfig(
            **_COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=1.5, norm_topk_prob=True),
        "jamba": lambda: C.JambaConfig(
            **{k: v for k, v in _COMMON.items() if k != "max_position_embeddings"}, intermediate_size=24,
            num_experts=4, num_experts_per_tok=2, expert_layer_period=1, expert_layer_offset=0,
            attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
            mamba_dt_rank=4),
        # DBRX in transformers 5.23 reads attn_config.rope_theta and needs clip_qkv set
        "dbrx": lambda: C.DbrxConfig(
            d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, initializer_range=0.2, attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}),
        "phimoe": lambda: C.PhimoeConfig(**_COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        # LFM2-MoE's config leaves layer_types None (the model needs one per layer): a conv and an attention layer
        "lfm2_moe": lambda: C.Lfm2MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                                            num_experts_per_tok=2, num_dense_layers=0,
                                            layer_types=["conv", "full_attention"]),
    }


CONFIGS = _configs()

# family -> (MoE block class, how it is compiled: "lifted" | "eager", words the explain() reason must hold)
BLOCKS = {
    "mixtral": ("MixtralSparseMoeBlock", "lifted", ()),
    "qwen2_moe": ("Qwen2MoeSparseMoeBlock", "lifted", ()),
    "qwen3_moe": ("Qwen3MoeSparseMoeBlock", "lifted", ()),
    "deepseek_v3": ("DeepseekV3MoE", "lifted", ()),
    "olmoe": ("OlmoeSparseMoeBlock", "lifted", ()),
    "gpt_oss": ("GptOssMLP", "lifted", ()),
    "granitemoe": ("GraniteMoeMoE", "lifted", ()),
    "glm4_moe": ("Glm4MoeMoE", "lifted", ()),
    "jamba": ("JambaSparseMoeBlock", "lifted", ()),
    "dbrx": ("DbrxFFN", "lifted", ()),
    "phimoe": ("PhimoeSparseMoeBlock", "eager", ("sparsemixer",)),
}


def build(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A fresh eval-mode fp32 model of family ``name`` with random weights (selection biases too)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():          # DeepSeek/GLM: a zero bias would not test the selection bias
            if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
                m.e_score_correction_bias.normal_(0.0, 0.2)
    return model


@functools.lru_cache(maxsize=None)
def pair(name: str):
    """``(eager, compiled)`` models of family ``name`` with equal weights (built once per process)."""
    import copy

    import moec
    eager = build(name)
    return eager, moec.compile(copy.deepcopy(eager))


def blocks(model, name: str) -> list:
    cls = BLOCKS[name][0]
    return [q for q, m in model.named_modules() if type(m).__name__ == cls]
