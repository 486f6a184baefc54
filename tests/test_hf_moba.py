"""transformers models with ``attn_implementation="moec_moba"`` against a MoBA attention written in
plain PyTorch the way Moonshot's reference writes it (a dense gate with the own block forced by +inf,
top-k, a causal mask), registered as another attention implementation: logits, greedy generation
with a KV cache (decode steps) against generation without one, and the arguments it refuses."""
import copy
import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AttentionInterface, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import hf_models  # noqa: E402
import moec  # noqa: E402
import moec.hf  # noqa: E402


def naive_moba(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """MoBA over whole sequences (no cache): query [B, H, N, D], key/value [B, Hkv, N, D]."""
    bs, topk = module.config.moba_block_size, module.config.moba_topk
    B, H, N, D = query.shape
    G = H // key.shape[1]
    outs = []
    for b in range(B):
        q, k, v = query[b].float(), key[b].float().repeat_interleave(G, 0), value[b].float().repeat_interleave(G, 0)
        nblk = math.ceil(N / bs)
        centroids = torch.stack([k[:, i * bs:min(N, (i + 1) * bs)].mean(1) for i in range(nblk)], 1)
        gate = torch.einsum("hsd,hnd->hsn", q, centroids)
        for i in range(nblk):
            gate[:, :(i + 1) * bs, i] = float("-inf")          # blocks not yet complete for these queries
            gate[:, i * bs:(i + 1) * bs, i] = float("inf")     # the own block always
        vals, idx = gate.topk(min(topk, nblk), dim=-1)
        need = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, idx, True) & (gate >= vals.min(-1, keepdim=True).values)
        mask = need.repeat_interleave(bs, -1)[..., :N] & torch.ones(N, N, dtype=torch.bool).tril()
        scores = (q @ k.transpose(1, 2)) * (scaling if scaling is not None else D ** -0.5)
        outs.append(torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v)
    return torch.stack(outs).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("moba_naive", naive_moba)
AttentionMaskInterface.register("moba_naive", sdpa_mask)
moec.hf.register()


def models(block_size=4, top_k=2):
    cfg = hf_models.CONFIGS["mixtral"]()
    cfg.moba_block_size, cfg.moba_topk = block_size, top_k
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(cfg, attn_implementation="moec_moba").eval()
    with torch.no_grad():            # the padding token's zero embedding would tie every gate score of
        ours.model.embed_tokens.weight[0].normal_()     # its query, where Moonshot's topk order is arbitrary
    ref = copy.deepcopy(ours)
    ref.set_attn_implementation("moba_naive")
    return ours, ref


IDS = torch.randint(3, hf_models.VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("block_size, top_k", [(4, 2), (3, 3), (16, 2)])
def test_logits_match_a_plain_pytorch_moba(block_size, top_k):
    ours, ref = models(block_size, top_k)
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, ref(IDS).logits, rtol=2e-4, atol=2e-4)


def test_greedy_generation_with_a_cache_matches_generation_without():
    """Decode steps (one query against the cache) give the rows a whole-sequence MoBA gives."""
    ours, ref = models()
    with torch.no_grad():
        got = ours.generate(IDS, max_new_tokens=7, do_sample=False, output_scores=True, return_dict_in_generate=True)
        want = ref.generate(IDS, max_new_tokens=7, do_sample=False, use_cache=False, output_scores=True,
                            return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


def test_with_moec_compile_the_moe_blocks_run_kernels_too():
    ours, ref = models()
    model = moec.compile(ours)
    with torch.no_grad():
        got = model.generate(IDS, max_new_tokens=4, do_sample=False)
        want = ref.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(got, want)
    assert "LIFTED" in model.explain()


def test_padded_batches_and_bad_settings_are_refused():
    ours, _ = models()
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="attention_mask"), torch.no_grad():
        ours(IDS, attention_mask=mask)
    ours.config.moba_topk = 0
    with pytest.raises(ValueError, match="moba_topk"), torch.no_grad():
        ours(IDS)
