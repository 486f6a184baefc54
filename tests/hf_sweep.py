"""Every MoE family of the installed transformers, compiled by moec and compared with eager.

A family is any causal-LM config whose fields name experts. Each gets a tiny random model built
from its default config with the sizes shrunk (no downloads), is compiled, and is compared with an
eager copy made before compiling: in eval and in training mode, with and without
``output_router_logits``. The outcome per family is one of

- ``LIFTED``: at least one MoE block runs moec's kernels and every logit matches eager;
- ``EXPERTS``: no block is lifted (``explain()`` gives the reason) but their experts modules (transformers'
  experts interface) run moec's kernels, the blocks' routing as written, and every logit matches eager;
- ``EAGER``: nothing runs moec's kernels, the logits match, and ``explain()`` gives the reason;
- ``WRONG``: a logit (or router logit) differs from eager;
- ``CRASH``: the compiled model raised where eager did not;
- ``SKIP``: the tiny model could not be built or run eagerly (not moec's concern).

Run ``python tests/hf_sweep.py [family ...]`` for a table.
"""
from __future__ import annotations

import copy
import sys
import traceback
from dataclasses import dataclass

import torch

VOCAB = 96
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                "moe_top_k", "ffn_config", "num_routed_experts")


def families() -> list[str]:
    """Names of the installed transformers' causal-LM families whose configs name experts."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    found = []
    for name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        cls = getattr(transformers, CONFIG_MAPPING_NAMES.get(name, ""), None)
        if cls is None:
            continue
        try:
            fields = cls().to_dict()
        except Exception:
            continue
        text = fields.get("text_config") if isinstance(fields.get("text_config"), dict) else {}
        if any(k in fields or k in text for k in _EXPERT_KEYS):
            found.append(name)
    return found


def _shrink(cfg, layers: int = 2) -> None:
    """Tiny sizes for ``cfg`` in place: 2 layers (both MoE where the config says which), hidden 32,
    4 heads of 8, few experts, a 96-token vocabulary."""
    d = cfg.to_dict()
    n_layers = d.get("num_hidden_layers") or d.get("num_layers") or d.get("n_layers")
    sizes = {
        "vocab_size": VOCAB, "hidden_size": 32, "d_model": 32, "num_attention_heads": 4, "n_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "max_seq_len": 64,
        "num_hidden_layers": layers, "num_layers": layers, "n_layers": layers,
        "intermediate_size": 48, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
        "expert_intermediate_size": 16, "ffn_hidden_size": 48,
        "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
        "num_routed_experts": 8, "num_experts_per_tok": 2, "moe_top_k": 2,
        "n_group": 2, "topk_group": 1, "first_k_dense_replace": 0, "moe_layer_start_index": 0,
        "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
        "qk_head_dim": 16, "initializer_range": 0.2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "sliding_window": 8, "decoder_sparse_step": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
        "moe_layer_freq": 1, "mlp_only_layers": [], "use_cache": True,
        "enable_moe_block": True, "top_k_experts": 2,         # Gemma4: an MoE block beside the dense MLP
        # Qwen4-Exp's indexed attention needs its indexer (left None in the default config)
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
        "indexer_compress_ratio": 4,
    }
    optional = ("head_dim", "num_experts_per_tok", "n_group", "topk_group", "num_experts", "top_k_experts",
                "moe_intermediate_size", "indexer_n_heads", "indexer_kv_heads", "indexer_head_dim", "indexer_budget",
                "indexer_compress_ratio")
    for key, value in sizes.items():
        settable = d.get(key) is not None or key in optional
        if key in d and settable and not isinstance(d[key], (dict, list)) or key == "mlp_only_layers" \
                and isinstance(d.get(key), list):
            try:
                setattr(cfg, key, value)
            except Exception:
                pass
    if d.get("kv_lora_rank"):                # multi-head latent attention: as many kv heads as heads
        cfg.num_key_value_heads = cfg.num_attention_heads
    lists = {k: v for k, v in d.items() if isinstance(v, list) and n_layers and len(v) == n_layers > layers}
    keep: list = []                          # per-layer lists: the first layer of each kind
    for v in lists.values():
        for kind in dict.fromkeys(map(str, v)):
            i = list(map(str, v)).index(kind)
            if i not in keep:
                keep.append(i)
    keep = sorted(set(keep) | set(range(max(0, layers - len(keep)))))
    if lists:
        for key in ("num_hidden_layers", "num_layers", "n_layers"):
            if key in d:
                setattr(cfg, key, len(keep))
    for key, value in lists.items():
        try:
            setattr(cfg, key, [value[i] for i in keep])
        except Exception:
            pass
    for key in ("text_config",):
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, layers)


# per-family settings the generic tiny config gets wrong
FAMILY_SIZES = {"bailing_hybrid": {"num_expert_group": 2, "topk_group": 1, "num_experts_per_token": 2},
               "longcat_flash": {"zero_expert_num": 4},             # (its default: 256 identity experts)
               "doge": {"is_moe": True, "num_experts": 64, "num_experts_per_tok": 4}}   # (its default is dense)


def build(name: str, seed: int = 0, experts_implementation=None, **kwargs):
    """An eval-mode fp32 tiny model of family ``name`` (random weights, selection biases too); ``kwargs`` set
    config fields, ``experts_implementation`` goes to ``from_config``."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    import hf_models
    if name in hf_models.CONFIGS:             # hand-written tiny configs where the generic one fails
        cfg = hf_models.CONFIGS[name]()
    else:
        cfg = getattr(transformers, CONFIG_MAPPING_NAMES[name])()
        _shrink(cfg)
    for key, value in {**FAMILY_SIZES.get(name, {}), **kwargs}.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        for m in model.modules():
            for attr in ("e_score_correction_bias", "expert_bias"):
                b = getattr(m, attr, None)
                if isinstance(b, torch.Tensor) and b.is_floating_point():
                    b.normal_(0.0, 0.2)
    return model


@dataclass
class Outcome:
    family: str
    status: str                 # LIFTED | EXPERTS | EAGER | WRONG | CRASH | SKIP
    detail: str = ""
    blocks: int = 0             # lifted regions that ran kernels


def _flat_logits(out) -> list:
    got = [out.logits]
    router = getattr(out, "router_logits", None)
    if isinstance(router, (tuple, list)):
        got += [r[0] if isinstance(r, tuple) else r for r in router if r is not None]
    elif isinstance(router, torch.Tensor):
        got.append(router)
    return got


def _run(model, ids, train: bool, router_logits: bool):
    model.train(train)
    torch.manual_seed(0)
    kwargs = {"output_router_logits": True} if router_logits else {}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs)


def check(name: str, tol: float = 2e-4) -> Outcome:
    """Compile the tiny model of ``name`` and compare it with eager in every mode."""
    import moec
    try:
        eager = build(name)
        ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
        modes = [(train, rl) for train in (False, True) for rl in (False, True)]
        refs = {}
        for mode in modes:
            try:
                refs[mode] = _flat_logits(_run(eager, ids, *mode))
            except Exception as e:
                if mode[1]:                   # the family does not take output_router_logits
                    continue
                raise
        twin = copy.deepcopy(eager)
    except Exception as e:
        return Outcome(name, "SKIP", f"eager: {type(e).__name__}: {str(e)[:120]}")
    try:
        model = moec.compile(twin)
        for mode, ref in refs.items():
            got = _flat_logits(_run(model, ids, *mode))
            if len(got) != len(ref):
                return Outcome(name, "WRONG", f"{mode}: {len(got)} outputs, eager {len(ref)}")
            for a, b in zip(got, ref):
                if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol):
                    err = (a - b).abs().max().item() if a.shape == b.shape else f"shape {tuple(a.shape)}"
                    return Outcome(name, "WRONG", f"train={mode[0]} router_logits={mode[1]}: max error {err}")
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return Outcome(name, "CRASH", f"{type(e).__name__}: {str(e)[:160]} ({tb.filename.split('/')[-1]}:{tb.lineno})")
    from moec.hf.block_experts import BlockExperts
    regions = [m.__dict__["_moec_region"] for m in model.modules() if "_moec_region" in m.__dict__]
    ran = [r for r in regions if any(k.startswith("kernels") for k in r.calls)]
    lines = [ln.strip() for ln in model.explain().splitlines() if ln.strip().startswith("EAGER")]
    blocks = [r for r in ran if not isinstance(r, BlockExperts)]
    if blocks:
        return Outcome(name, "LIFTED", "", len(blocks))
    if ran:             # the blocks' routing as written, their experts modules on the kernels
        return Outcome(name, "EXPERTS", lines[0] if lines else "", len(ran))
    return Outcome(name, "EAGER", lines[0] if lines else model.explain().strip().splitlines()[-1])


def main(names: list[str]) -> int:
    names = names or families()
    counts: dict = {}
    for name in names:
        o = check(name)
        counts[o.status] = counts.get(o.status, 0) + 1
        print(f"{o.status:7s} {name:28s} {o.blocks or '':2} {o.detail}", flush=True)
    print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("WRONG") or counts.get("CRASH") else 0


if __name__ == "__main__":
    import os
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(main(sys.argv[1:]))
