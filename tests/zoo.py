"""A zoo of eager Mixture-of-Experts layers, written the way model code writes them.

Plain torch only (no moec imports): these are the user programs moec must recognise. Every
module's forward takes ``hidden_states`` of shape ``[B, S, d]`` (some accept any ``[..., d]``)
and returns a tensor of the same shape, or a pair ``(y, router_logits)`` / ``(y, aux_loss)``.
Parameters are drawn from torch's global RNG, so ``torch.manual_seed`` before construction
makes a module reproducible.

MoE layers                       router                                   experts
- MixtralMoE                     softmax -> top-k -> renormalise          ModuleList SwiGLU, where/index_add_
- MixtralSkipEmptyMoE            same, ``if top_x.numel() == 0: continue`` ModuleList SwiGLU
- MixtralTopkSoftmaxMoE          top-k logits -> softmax (mistral-src)    ModuleList SwiGLU, ``results[idx] +=``
- MixtralLogitsMoE               softmax -> top-k, returns router_logits  ModuleList SwiGLU
- StackedSortMoE                 softmax -> top-k (no renormalise)        [E, d, f] params, argsort/bincount loop
- StackedGatherBmmMoE            softmax -> top-k -> renormalise          fused [E, d, 2f] gate-up, ``w[ids]`` + bmm, GeGLU(tanh)
- StackedExpertsModuleMoE        router module with an [E, d] weight      experts module, [E, 2f, d] / [E, d, f], loop over hit experts
- DenseOneHotMoE                 sigmoid -> top-k -> renormalise -> x2    [E, f, d] params, einsum over all experts
- DeepseekV3MoE                  sigmoid, score bias, top2-sum groups, renorm, x2.5, shared expert; sort-by-expert loop
- DeepseekV2MoE                  softmax, max-score groups, no renormalise, x16; ``y[mask] = expert(x[mask])``
- SwitchMoE                      top-1 softmax (no renormalise), ReLU or GELU experts in a ModuleDict
- QwenMoE                        softmax -> top-k, shared expert with sigmoid gate, returns router_logits
- CapacityMoE                    capacity factor, overflow dropped or moved to the next-best expert
- NoisyTopKMoE                   Shazeer noisy top-k gating (noise in training only), ReLU experts
- AuxLossMoE                     softmax -> top-k -> renormalise, returns the load-balancing loss
- BiasedExpertMoE                Mixtral routing                          ModuleList SwiGLU, nn.Linear with biases
- BiasedFusedExpertMoE           Mixtral routing                          ModuleList, fused gate-up linear with bias, GELU
- PlainLinearMoE                 Mixtral routing, own Linear class        ModuleList SwiGLU of ``F.linear`` modules
- GShardTop2MoE                  top-2 as argmax, mask, argmax; renormalised  ModuleList SwiGLU, loop over picks
- WrappedExpertsMoE              softmax -> top-k -> renormalise          ModuleList inside an experts wrapper module
- STMoE                          returns a namedtuple (y, aux loss, z-loss, tokens per expert)
- LogitsZLossMoE                 returns (y, router logits, z-loss, None)
- Relu2ExpertMoE                 Mixtral routing                          ModuleList, up -> relu(x)**2 -> down
- LogitsBiasTopKMoE              top-k of logits + bias, sigmoid of the picks, renormalised; shared expert
- IdentityExpertMoE              softmax over E + 1 choices -> top-k; choice E passes the token through, weighted
- SwitchCapacityMoE              Switch top-1, a fixed capacity per expert and sequence (cumsum over the sequence),
                                 a dropped token passes through; returns [B, S, E] router logits
- DenseDispatchMoE               GShard top-2 with capacity and a minimum, dense [S, E, C] dispatch/combine einsums,
                                 stacked [E, d, f] experts
- FairseqTop2MoE                 fairseq / DeepSpeed top-2 gating: capacity, then both gates normalised over the kept
                                 pairs; ModuleList SwiGLU
- FloorCapacityMoE               a capacity truncated by int() with a minimum
Capacity moec must confirm on long inputs or leave eager: SequenceFirstSwitchMoE (cumsum over dim 0 of [S, B, d]),
GroupedCapacityMoE (Mesh-TF groups of 64 tokens).
Negative examples: DenseMLP, TanhExpertMoE, PartialBiasExpertMoE, ExtraArgMoE, TemperatureMoE, MLPRouterMoE,
ProductKeyMoE (PEER-style rank-one experts in embedding tables, picked by product keys).
"""
from __future__ import annotations

import collections
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------

class MixtralBlockSparseTop2MLP(nn.Module):
    """Mixtral's expert: ``w2(silu(w1(x)) * w3(x))``."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states):
        current_hidden_states = self.act_fn(self.w1(hidden_states)) * self.w3(hidden_states)
        return self.w2(current_hidden_states)


class GatedMLP(nn.Module):
    """The Llama/Qwen/DeepSeek MLP: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FusedGateUpMLP(nn.Module):
    """Phi-3 style: one ``gate_up_proj`` linear, split with ``chunk``."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, hidden_states):
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DenseActDense(nn.Module):
    """Switch Transformer's expert: ``wo(act(wi(x)))`` (dropout 0)."""

    def __init__(self, d: int, f: int, act: str = "relu"):
        super().__init__()
        self.wi = nn.Linear(d, f, bias=False)
        self.wo = nn.Linear(f, d, bias=False)
        self.dropout = nn.Dropout(0.0)
        self.act = nn.ReLU() if act == "relu" else nn.GELU()

    def forward(self, hidden_states):
        hidden_states = self.act(self.wi(hidden_states))
        hidden_states = self.dropout(hidden_states)
        return self.wo(hidden_states)


class FeedForward(nn.Module):
    """Shazeer's expert: two linears around a ReLU."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc1 = nn.Linear(d, f, bias=False)
        self.fc2 = nn.Linear(f, d, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


# ----------------------------------------------------------------------------------------------
# a. Mixtral: a ModuleList of experts, a loop with torch.where and index_add_
# ----------------------------------------------------------------------------------------------

class MixtralMoE(nn.Module):
    """Hugging Face's ``MixtralSparseMoeBlock`` (router softmax in float, top-k, renormalise)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2, norm_topk_prob: bool = True):
        super().__init__()
        self.hidden_dim = d
        self.ffn_dim = f
        self.num_experts = E
        self.top_k = k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def route(self, hidden_states):
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        return router_logits, routing_weights, selected_experts

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits, routing_weights, selected_experts = self.route(hidden_states)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class MixtralSkipEmptyMoE(MixtralMoE):
    """Mixtral with the data-dependent ``if top_x.numel() == 0: continue`` (not fx-traceable)."""

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits, routing_weights, selected_experts = self.route(hidden_states)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            if top_x.numel() == 0:
                continue
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class MixtralTopkSoftmaxMoE(nn.Module):
    """mistral-src's original MoE: top-k of the logits, then softmax over the k kept."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__()
        self.num_experts_per_tok = k
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def forward(self, hidden_states):
        inputs = hidden_states.reshape(-1, hidden_states.shape[-1])
        gate_logits = self.gate(inputs)
        weights, selected_experts = torch.topk(gate_logits, self.num_experts_per_tok)
        weights = F.softmax(weights, dim=1, dtype=torch.float).to(inputs.dtype)
        results = torch.zeros_like(inputs)
        for i, expert in enumerate(self.experts):
            batch_idx, nth_expert = torch.where(selected_experts == i)
            results[batch_idx] += weights[batch_idx, nth_expert, None] * expert(inputs[batch_idx])
        return results.view_as(hidden_states)


class MixtralLogitsMoE(MixtralMoE):
    """Mixtral returning ``(final_hidden_states, router_logits)`` as Hugging Face does."""

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits, routing_weights, selected_experts = self.route(hidden_states)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


# ----------------------------------------------------------------------------------------------
# b. Stacked 3-D expert weights
# ----------------------------------------------------------------------------------------------

class StackedSortMoE(nn.Module):
    """``[E, d, f]`` / ``[E, f, d]`` parameters, tokens sorted by expert (argsort + bincount)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__()
        self.num_experts = E
        self.top_k = k
        self.router = nn.Linear(d, E, bias=False)
        self.w_gate = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
        self.w_up = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
        self.w_down = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        topk_weights, topk_ids = probs.topk(self.top_k, dim=-1)
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        token_of = order // self.top_k
        xs = x[token_of]
        out = torch.zeros_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n > 0:
                h = xs[start:start + n]
                out[start:start + n] = (F.silu(h @ self.w_gate[e]) * (h @ self.w_up[e])) @ self.w_down[e]
            start += n
        y = torch.zeros_like(x)
        y.index_add_(0, token_of, out * topk_weights.reshape(-1)[order, None].to(x.dtype))
        return y.reshape(shape)


class StackedGatherBmmMoE(nn.Module):
    """Llama-4 style fused ``gate_up_proj [E, d, 2f]``; per-pair weights gathered, then bmm."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__()
        self.num_experts = E
        self.top_k = k
        self.gate = nn.Linear(d, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, d, 2 * f) / math.sqrt(d))
        self.down_proj = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f))

    def forward(self, hidden_states):
        T = hidden_states.numel() // hidden_states.shape[-1]
        x = hidden_states.reshape(T, -1)
        scores = self.gate(x).softmax(dim=-1)
        weights, ids = scores.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = ids.reshape(-1)
        xr = x.repeat_interleave(self.top_k, dim=0)
        gate_up = torch.bmm(xr.unsqueeze(1), self.gate_up_proj[flat])
        gate, up = gate_up.chunk(2, dim=-1)
        h = F.gelu(gate, approximate="tanh") * up
        out = torch.bmm(h, self.down_proj[flat]).squeeze(1)
        y = (out.view(T, self.top_k, -1) * weights.unsqueeze(-1)).sum(dim=1)
        return y.view(hidden_states.shape)


class MixtralExperts(nn.Module):
    """transformers-v5 style experts: one module, ``[E, 2f, d]`` / ``[E, d, f]`` in nn.Linear layout,
    looping over the experts that were hit."""

    def __init__(self, d: int, f: int, E: int):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * f, d) / math.sqrt(d))
        self.down_proj = nn.Parameter(torch.randn(E, d, f) / math.sqrt(f))
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


class MixtralTopKRouter(nn.Module):
    def __init__(self, d: int, E: int, k: int):
        super().__init__()
        self.top_k = k
        self.weight = nn.Parameter(torch.empty(E, d))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, hidden_states):
        router_logits = F.linear(hidden_states, self.weight)
        router_probs = F.softmax(router_logits.float(), dim=-1)
        router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
        return router_logits, router_top_value.to(router_logits.dtype), router_indices


class StackedExpertsModuleMoE(nn.Module):
    """transformers-v5 Mixtral: a router module with an ``[E, d]`` weight and an experts module."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__()
        self.gate = MixtralTopKRouter(d, E, k)
        self.experts = MixtralExperts(d, f, E)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        hidden_states = self.experts(hidden_states, top_k_index, top_k_weights)
        return hidden_states.reshape(batch_size, sequence_length, hidden_dim)


# ----------------------------------------------------------------------------------------------
# c. Dense one-hot: every expert on every token, weighted by a dense routing matrix
# ----------------------------------------------------------------------------------------------

class DenseOneHotMoE(nn.Module):
    """All experts for all tokens (einsum); sigmoid router, renormalised, scaled by 2.

    Attribute names are deliberately unconventional: k and the scale are read off the graph.
    """

    def __init__(self, d: int = 16, f: int = 24, E: int = 4, k: int = 2):
        super().__init__()
        self.n_active = k
        self.proj = nn.Linear(d, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, f, d) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(E, d, f) / math.sqrt(f))

    def forward(self, hidden_states):
        scores = torch.sigmoid(self.proj(hidden_states))
        vals, idx = torch.topk(scores, self.n_active, dim=-1)
        vals = vals / vals.sum(-1, keepdim=True)
        route = torch.zeros_like(scores).scatter(-1, idx, vals) * 2.0
        h = F.gelu(torch.einsum("...d,efd->...ef", hidden_states, self.w_in))
        out = torch.einsum("...ef,edf->...ed", h, self.w_out)
        return torch.einsum("...e,...ed->...d", route, out)


# ----------------------------------------------------------------------------------------------
# d. Router variants
# ----------------------------------------------------------------------------------------------

class DeepseekV3TopkRouter(nn.Module):
    """DeepSeek-V3's ``noaux_tc`` gate: sigmoid, bias for selection only, top2-sum groups."""

    def __init__(self, d, E, k, n_group, topk_group, routed_scaling_factor, norm_topk_prob=True):
        super().__init__()
        self.top_k = k
        self.n_routed_experts = E
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(E, d))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("e_score_correction_bias", 0.1 * torch.randn(E))

    def forward(self, hidden_states):
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        scores = router_logits.sigmoid()
        scores_for_choice = scores + self.e_score_correction_bias.unsqueeze(0)
        group_scores = (
            scores_for_choice.view(-1, self.n_group, self.n_routed_experts // self.n_group)
            .topk(2, dim=-1)[0].sum(dim=-1))
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1)
            .expand(-1, self.n_group, self.n_routed_experts // self.n_group)
            .reshape(-1, self.n_routed_experts))
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob:
            denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
            topk_weights /= denominator
        topk_weights = topk_weights * self.routed_scaling_factor
        return topk_indices, topk_weights


class DeepseekV3MoE(nn.Module):
    """DeepSeek-V3 MoE: routed experts by sort-by-expert (``moe_infer``) plus a shared expert."""

    def __init__(self, d: int = 16, f: int = 16, E: int = 8, k: int = 3, n_group: int = 4, topk_group: int = 2,
                 routed_scaling_factor: float = 2.5, n_shared_experts: int = 1):
        super().__init__()
        self.experts = nn.ModuleList([GatedMLP(d, f) for _ in range(E)])
        self.gate = DeepseekV3TopkRouter(d, E, k, n_group, topk_group, routed_scaling_factor)
        self.shared_experts = GatedMLP(d, f * n_shared_experts)

    def moe_infer(self, x, topk_ids, topk_weight):
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        tokens_per_expert = tokens_per_expert.cpu().numpy()
        outputs = []
        start_idx = 0
        for i, num_tokens in enumerate(tokens_per_expert):
            end_idx = start_idx + num_tokens
            if num_tokens == 0:
                continue
            expert = self.experts[i]
            outputs.append(expert(sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if len(outputs) else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        final_out = (
            new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype)
            .mul_(topk_weight.unsqueeze(dim=-1)).sum(dim=1).type(new_x.dtype))
        return final_out

    def forward(self, hidden_states):
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(*orig_shape)
        return y + self.shared_experts(identity)


class DeepseekV2MoE(nn.Module):
    """DeepSeek-V2 ``group_limited_greedy``: softmax, groups scored by their max, no renormalise."""

    def __init__(self, d: int = 16, f: int = 16, E: int = 8, k: int = 2, n_group: int = 4, topk_group: int = 2,
                 routed_scaling_factor: float = 16.0):
        super().__init__()
        self.num_experts_per_tok = k
        self.n_routed_experts = E
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([GatedMLP(d, f) for _ in range(E)])

    def forward(self, hidden_states):
        orig_shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, orig_shape[-1])
        logits = self.gate(hidden_states)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        n_tokens = hidden_states.shape[0]
        group_scores = scores.view(n_tokens, self.n_group, -1).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(
            n_tokens, self.n_group, self.n_routed_experts // self.n_group).reshape(n_tokens, -1)
        tmp_scores = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_weight, topk_idx = torch.topk(tmp_scores, k=self.num_experts_per_tok, dim=-1, sorted=False)
        topk_weight = topk_weight * self.routed_scaling_factor
        flat_topk_idx = topk_idx.view(-1)
        x = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
        y = torch.empty_like(x)
        for i, expert in enumerate(self.experts):
            y[flat_topk_idx == i] = expert(x[flat_topk_idx == i]).to(y.dtype)
        y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        return y.to(hidden_states.dtype).view(*orig_shape)


class SwitchRouter(nn.Module):
    def __init__(self, d: int, E: int, router_bias: bool = False):
        super().__init__()
        self.classifier = nn.Linear(d, E, bias=router_bias)

    def forward(self, hidden_states):
        router_logits = self.classifier(hidden_states)
        router_probs = F.softmax(router_logits.float(), dim=-1)
        expert_index = torch.argmax(router_probs, dim=-1)
        router_probs = torch.max(router_probs, dim=-1).values.unsqueeze(-1)
        return expert_index, router_probs


class SwitchMoE(nn.Module):
    """Switch Transformer top-1 (softmax probability of the chosen expert, no renormalise)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, act: str = "relu", router_bias: bool = False):
        super().__init__()
        self.router = SwitchRouter(d, E, router_bias)
        self.experts = nn.ModuleDict({f"expert_{i}": DenseActDense(d, f, act) for i in range(E)})

    def forward(self, hidden_states):
        expert_index, router_probs = self.router(hidden_states)
        next_states = torch.zeros_like(hidden_states)
        for idx, expert in enumerate(self.experts.values()):
            token_indices = expert_index == idx
            next_states[token_indices] = expert(hidden_states[token_indices]).to(next_states.dtype)
        return (router_probs * next_states).to(hidden_states.dtype)


class QwenMoE(nn.Module):
    """Qwen2-MoE's sparse block: softmax top-k (no renormalise) plus a sigmoid-gated shared expert."""

    def __init__(self, d: int = 16, f: int = 16, E: int = 4, k: int = 2, shared_f: int = 48):
        super().__init__()
        self.num_experts = E
        self.top_k = k
        self.norm_topk_prob = False
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([GatedMLP(d, f) for _ in range(E)])
        self.shared_expert = GatedMLP(d, shared_f)
        self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def forward(self, hidden_states):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        shared_expert_output = self.shared_expert(hidden_states)
        shared_expert_output = F.sigmoid(self.shared_expert_gate(hidden_states)) * shared_expert_output
        final_hidden_states = final_hidden_states + shared_expert_output
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


class CapacityMoE(nn.Module):
    """Expert capacity ``C = ceil(capacity_factor * T * k / E)``; slot-major, then token priority.

    ``overflow="drop"``: pairs beyond capacity get weight 0 (GShard position-in-expert cumsum).
    ``overflow="next_best"``: overflowing pairs move, round by round, to their token's next-ranked
    expert that still has room (weight: that expert's probability, same normalisation).
    """

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2, capacity_factor: float = 1.0,
                 overflow: str = "drop", norm_topk_prob: bool = False):
        super().__init__()
        self.num_experts = E
        self.top_k = k
        self.capacity_factor = capacity_factor
        self.overflow = overflow
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def _drop(self, topk_ids, topk_weights, capacity):
        T, k = topk_ids.shape
        slot_major = F.one_hot(topk_ids.t().reshape(-1), self.num_experts)          # [k*T, E]
        position_in_expert = ((torch.cumsum(slot_major, dim=0) - 1) * slot_major).sum(-1)
        keep = (position_in_expert < capacity).view(k, T).t()
        return torch.where(keep, topk_ids, -1), topk_weights * keep

    def _next_best(self, probs, topk_ids, topk_weights, capacity, factor):
        T, k = topk_ids.shape
        preference = torch.argsort(probs, dim=-1, descending=True, stable=True).tolist()
        ids = torch.full_like(topk_ids, -1)
        weights = torch.zeros_like(topk_weights)
        load = [0] * self.num_experts
        next_rank = [k] * T
        candidate = {(s, t): int(topk_ids[t, s]) for s in range(k) for t in range(T)}
        pending = sorted(candidate)                       # slot-major, then token order
        while pending:
            overflowed = []
            for s, t in pending:
                e = candidate[s, t]
                if load[e] < capacity:
                    load[e] += 1
                    ids[t, s] = e
                    weights[t, s] = probs[t, e] * factor[t]
                else:
                    overflowed.append((s, t))
            pending = []
            for s, t in overflowed:
                if next_rank[t] < self.num_experts:
                    candidate[s, t] = preference[t][next_rank[t]]
                    next_rank[t] += 1
                    pending.append((s, t))
        return ids, weights

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        T = x.shape[0]
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        factor = torch.ones(T, dtype=probs.dtype, device=probs.device)
        if self.norm_topk_prob:
            factor = 1.0 / topk_weights.sum(dim=-1)
            topk_weights = topk_weights * factor[:, None]
        capacity = max(1, math.ceil(self.capacity_factor * T * self.top_k / self.num_experts))
        if self.overflow == "drop":
            topk_ids, topk_weights = self._drop(topk_ids, topk_weights, capacity)
        else:
            topk_ids, topk_weights = self._next_best(probs, topk_ids, topk_weights, capacity, factor)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(topk_ids == e)
            y.index_add_(0, tok, (expert(x[tok]) * topk_weights[tok, slot, None]).to(x.dtype))
        return y.reshape(shape)


class NoisyTopKMoE(nn.Module):
    """Shazeer et al. (2017) noisy top-k gating: Gaussian noise scaled by softplus, training only."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__()
        self.num_experts = E
        self.k = k
        self.w_gate = nn.Linear(d, E, bias=False)
        self.w_noise = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([FeedForward(d, f) for _ in range(E)])

    def noisy_top_k_gating(self, x):
        clean_logits = self.w_gate(x)
        if self.training:
            noise_stddev = F.softplus(self.w_noise(x))
            logits = clean_logits + torch.randn_like(clean_logits) * noise_stddev
        else:
            logits = clean_logits
        top_logits, top_indices = logits.topk(min(self.k + 1, self.num_experts), dim=1)
        top_k_logits = top_logits[:, :self.k]
        top_k_indices = top_indices[:, :self.k]
        top_k_gates = F.softmax(top_k_logits, dim=1)
        return torch.zeros_like(logits).scatter(1, top_k_indices, top_k_gates)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        gates = self.noisy_top_k_gating(x)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = torch.nonzero(gates[:, e] > 0).squeeze(-1)
            y[rows] += gates[rows, e, None] * expert(x[rows])
        return y.view_as(hidden_states)


class AuxLossMoE(nn.Module):
    """Top-k softmax routing that also returns the load-balancing loss (Switch / Mixtral form)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__()
        self.num_experts = E
        self.top_k = k
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([FusedGateUpMLP(d, f) for _ in range(E)])

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        router_probs = torch.softmax(self.router(x).float(), dim=-1)
        topk_weights, topk_ids = torch.topk(router_probs, self.top_k, dim=-1)
        topk_weights = (topk_weights / topk_weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        expert_mask = F.one_hot(topk_ids, self.num_experts).float()                 # [T, k, E]
        tokens_per_expert = expert_mask.mean(dim=0)                                # [k, E]
        router_prob_per_expert = router_probs.mean(dim=0)                          # [E]
        aux_loss = self.num_experts * torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(topk_ids == e)
            y.index_add_(0, tok, expert(x[tok]) * topk_weights[tok, slot, None])
        return y.reshape(shape), aux_loss


# ----------------------------------------------------------------------------------------------
# e. Negative examples
# ----------------------------------------------------------------------------------------------

class DenseMLP(nn.Module):
    """No experts at all: an ordinary gated MLP."""

    def __init__(self, d: int = 16, f: int = 32):
        super().__init__()
        self.mlp = GatedMLP(d, f)

    def forward(self, hidden_states):
        return self.mlp(hidden_states)


class TanhExpert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.w2(torch.tanh(self.w1(x)) * self.w3(x))


class TanhExpertMoE(MixtralMoE):
    """Mixtral routing, but experts use tanh (unsupported activation)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.experts = nn.ModuleList([TanhExpert(d, f) for _ in range(E)])


class BiasedExpert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=True)
        self.w2 = nn.Linear(f, d, bias=True)
        self.w3 = nn.Linear(d, f, bias=True)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class BiasedExpertMoE(MixtralMoE):
    """Mixtral routing; each expert's linears carry biases."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.experts = nn.ModuleList([BiasedExpert(d, f) for _ in range(E)])


class BiasedFusedExpert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_up = nn.Linear(d, 2 * f)
        self.down = nn.Linear(f, d)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.gelu(gate) * up)


class BiasedFusedExpertMoE(MixtralMoE):
    """Mixtral routing; experts with one fused gate-up linear and a down linear, all with biases."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.experts = nn.ModuleList([BiasedFusedExpert(d, f) for _ in range(E)])


class PartialBiasExpertMoE(MixtralMoE):
    """Mixtral routing; the experts' up projections have biases, the others not (unsupported)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        for e in self.experts:
            e.w3 = nn.Linear(d, f, bias=True)


class ExtraArgMoE(MixtralMoE):
    """Mixtral whose forward takes a required ``attention_mask`` too."""

    def forward(self, hidden_states, attention_mask):
        return super().forward(hidden_states * attention_mask[..., None])


class TemperatureMoE(MixtralMoE):
    """Router softmax at temperature 2 (not expressible by RouterConfig): must not lift."""

    def route(self, hidden_states):
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits / 2.0, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        return router_logits, routing_weights.to(hidden_states.dtype), selected_experts


class IdentityExpertMoE(MixtralMoE):
    """Mixtral whose router also scores a "skip" choice (index E: the token passes through
    unchanged, weighted): an identity expert (the router scores E + 1 choices)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.gate = nn.Linear(d, E + 1, bias=False)
        self.num_choices = E + 1

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x), dim=-1)
        weights, picks = torch.topk(probs, self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for choice in range(self.num_choices):
            tok, slot = torch.where(picks == choice)
            if tok.numel() == 0:
                continue
            y = x[tok] if choice == self.num_experts else self.experts[choice](x[tok])
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out.reshape(shape)


class MLPRouter(nn.Module):
    def __init__(self, d: int, E: int, width: int = 24):
        super().__init__()
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, E)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MLPRouterMoE(MixtralMoE):
    """Mixtral whose router is a two-layer MLP (an external router: moec calls it, the kernels route)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.gate = MLPRouter(d, E)


class TanhRouterMoE(nn.Module):
    """A research repository's MoE: a two-layer tanh MLP router in an ``nn.Sequential``, experts as stacked
    ``[E, d, f]`` parameters run by ``torch.einsum`` over the tokens each expert was given, and the forward
    returns ``(y, aux)`` with a Switch-style balance loss over the top-k pairs."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2, hidden: int = 32):
        super().__init__()
        self.num_experts, self.top_k = E, k
        self.router = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, E))
        self.w_in = nn.Parameter(torch.randn(E, d, 2 * f) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f))

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_p = top_p / top_p.sum(-1, keepdim=True)
        counts = F.one_hot(top_i, self.num_experts).sum((0, 1)).float()
        aux = self.num_experts * (counts / x.shape[0] * probs.mean(0)).sum()
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)
            a, b = torch.einsum("td,df->tf", x[rows], self.w_in[e]).chunk(2, dim=-1)
            out = torch.einsum("tf,fd->td", F.silu(a) * b, self.w_out[e])
            y.index_add_(0, rows, (out * top_p[rows, slot, None]).to(x.dtype))
        return y.reshape(shape), aux


class NormedRouter(nn.Module):
    """A router that normalises the hidden states before its projection (no single linear)."""

    def __init__(self, d: int, E: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, E, bias=False)

    def forward(self, x):
        return self.proj(self.norm(x))


class NormedRouterMoE(nn.Module):
    """DeepSeek-V3 style selection (sigmoid scores, a selection bias buffer for the top-k only, renormalised and
    scaled weights) behind a router of the repository's own that normalises its input: the router's inner
    linear alone does not reproduce the forward, calling the router does. A shared expert is added."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 8, k: int = 2):
        super().__init__()
        self.top_k, self.routed_scaling_factor = k, 1.5
        self.gate = NormedRouter(d, E)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.1)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])
        self.shared_expert = MixtralBlockSparseTop2MLP(d, f)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores = self.gate(x).float().sigmoid()
        ids = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True) * self.routed_scaling_factor
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(ids == e)
            y.index_add_(0, rows, (expert(x[rows]) * weights[rows, slot, None]).to(x.dtype))
        return (y + self.shared_expert(x)).reshape(shape)


class RMSNormedMLP(nn.Module):
    """A shared expert as Ergo writes it: a relu² MLP whose output its own RMSNorm normalises."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, x):
        return self.norm(self.down_proj(F.relu(self.up_proj(x)).square()))


class NormedSharedMoE(nn.Module):
    """Sigmoid routing with a selection bias over stacked relu² experts (``[E, d, f]`` / ``[E, f, d]``, run by
    ``@`` on the rows each expert got), plus a shared expert moec does not read (its own RMSNorm): the compiled
    layer calls it as the forward does and adds it to the kernels' output."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 8, k: int = 2):
        super().__init__()
        self.num_experts, self.top_k = E, k
        self.gate = nn.Linear(d, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.1)
        self.up_proj = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
        self.down_proj = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f))
        self.shared_experts = RMSNormedMLP(d, 2 * f)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores = self.gate(x).float().sigmoid()
        ids = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        y = torch.zeros_like(x)
        for e in ids.unique().tolist():
            rows, slot = (ids == e).nonzero(as_tuple=True)
            out = F.relu(x[rows] @ self.up_proj[e]).square() @ self.down_proj[e]
            y.index_add_(0, rows, (out * weights[rows, slot, None]).to(x.dtype))
        return y.reshape(shape) + self.shared_experts(hidden_states)


class GeluSharedMoE(MixtralMoE):
    """Mixtral's SwiGLU experts with a plain GELU shared expert (another activation than the routed experts',
    which one MoESpec cannot hold): the shared expert runs as its own module beside the kernels."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.shared_expert = nn.Sequential(nn.Linear(d, 2 * f), nn.GELU(), nn.Linear(2 * f, d))

    def forward(self, hidden_states):
        return super().forward(hidden_states) + self.shared_expert(hidden_states)


class ExpertNormMoE(nn.Module):
    """Ergo-style experts written out: a sigmoid router with a selection bias, stacked relu² experts, each pair's
    expert output RMS-normalised by its expert's own learned scale (``expert_norm [E, d]``) before the weighted
    sum, and a shared expert with its own RMSNorm (an external shared expert)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 8, k: int = 2, eps: float = 1e-6):
        super().__init__()
        self.num_experts, self.top_k, self.eps = E, k, eps
        self.router = nn.Linear(d, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.1)
        self.w_in = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f))
        self.expert_norm = nn.Parameter(1.0 + 0.2 * torch.randn(E, d))
        self.shared = RMSNormedMLP(d, f)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        scores = self.router(h).float().sigmoid()
        ids = (scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        rows = h.repeat_interleave(self.top_k, dim=0)
        flat = ids.reshape(-1)
        out = torch.empty_like(rows)
        for e in flat.unique().tolist():
            sel = flat == e
            out[sel] = F.relu(rows[sel] @ self.w_in[e]).square() @ self.w_out[e]
        out = F.rms_norm(out.float(), (shape[-1],), eps=self.eps) * self.expert_norm[flat]
        y = (out.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1)).sum(1).to(x.dtype)
        return y.reshape(shape) + self.shared(x)


class PlainLinear(nn.Module):
    """A repository's own linear layer (not an ``nn.Linear``): ``F.linear`` on its own parameters,
    kaiming-uniform initialised, ready to be swapped for a quantised one."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class PlainLinearExpert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w1, self.w2, self.w3 = PlainLinear(d, f), PlainLinear(f, d), PlainLinear(d, f)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PlainLinearMoE(MixtralMoE):
    """Mixtral written with a repository's own linear layer for the router and the experts."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.gate = PlainLinear(d, E)
        self.experts = nn.ModuleList([PlainLinearExpert(d, f) for _ in range(E)])


class GShardTop2MoE(nn.Module):
    """GShard-style top-2: the best expert by argmax, then the best of the rest (the first one masked);
    the two gates renormalised; a loop over experts and over the two picks."""

    def __init__(self, d=16, f=32, E=4):
        super().__init__()
        self.wg = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])
        self.E = E

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gates = F.softmax(self.wg(x), dim=-1)
        idx1 = torch.argmax(gates, dim=-1)
        mask1 = F.one_hot(idx1, self.E).to(gates.dtype)
        idx2 = torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=-1)
        mask2 = F.one_hot(idx2, self.E).to(gates.dtype)
        g1 = (gates * mask1).sum(-1)
        g2 = (gates * mask2).sum(-1)
        denom = (g1 + g2).clamp(min=torch.finfo(gates.dtype).eps)
        g1, g2 = g1 / denom, g2 / denom
        out = torch.zeros_like(x)
        for e in range(self.E):
            for idx, g in ((idx1, g1), (idx2, g2)):
                sel = torch.nonzero(idx == e).squeeze(-1)
                if sel.numel():
                    out.index_add_(0, sel, self.experts[e](x[sel]) * g[sel, None])
        return out.reshape(shape)

class ExpertsWrapper(nn.Module):
    """The experts in a module of their own, which takes the routing and combines."""

    def __init__(self, d, f, E):
        super().__init__()
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def forward(self, x, idx, w):
        out = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, ex(x[tok]) * w[tok, slot, None])
        return out

class WrappedExpertsMoE(nn.Module):
    """Router in the layer, experts (a ModuleList) inside a wrapper module that applies them."""

    def __init__(self, d=16, f=32, E=4, k=2):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.experts = ExpertsWrapper(d, f, E)
        self.k = k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        w, idx = torch.topk(self.router(x).softmax(-1), self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return self.experts(x, idx, w).reshape(shape)


STMoEOutput = collections.namedtuple("STMoEOutput", "hidden_states aux_loss z_loss tokens_per_expert")


class STMoE(MixtralMoE):
    """ST-MoE-style training layer: returns a namedtuple of the output, the load-balancing loss, the
    router z-loss and the tokens per expert."""

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        logits = self.gate(x)
        probs = logits.softmax(-1)
        w, ids = probs.topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                y.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts)
        frac = F.one_hot(ids, self.num_experts).sum(1).float().mean(0)
        aux = self.num_experts * (frac * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        return STMoEOutput(y.view(b, s, d), aux, z, counts)


class LogitsZLossMoE(MixtralMoE):
    """Returns a 4-tuple: the output, the router logits, the router z-loss and a None placeholder."""

    def forward(self, hidden_states):
        logits = self.gate(hidden_states.view(-1, hidden_states.shape[-1]))
        y = super().forward(hidden_states)
        return y, logits, torch.logsumexp(logits, -1).square().mean(), None


class Relu2Expert(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class Relu2ExpertMoE(MixtralMoE):
    """Mixtral routing; non-gated experts with a squared ReLU (Nemotron-H, Primer)."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.experts = nn.ModuleList([Relu2Expert(d, f) for _ in range(E)])


class LogitsBiasTopKMoE(nn.Module):
    """Top-k of the router logits plus a selection bias, weights the sigmoid of the picked logits,
    renormalised (Kolibri); a shared expert beside."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 8, k: int = 2):
        super().__init__()
        self.top_k = k
        self.weight = nn.Parameter(torch.randn(E, d) * 0.3)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.5)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])
        self.shared_experts = GatedMLP(d, f)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = F.linear(x.float(), self.weight.float())
        ids = torch.topk(logits + self.e_score_correction_bias, self.top_k, dim=-1)[1]
        w = logits.gather(1, ids).sigmoid()
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None].to(x.dtype))
        return (out + self.shared_experts(x)).reshape(shape)


class PostNormMoE(MixtralMoE):
    """Mixtral whose combined output is normalised inside the block (A.X-K1's ``post_mlp_layernorm``,
    research blocks' ``self.norm(moe_out)``): an RMS norm with a learned scale, written out."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.out_norm = RMSNorm(d)

    def forward(self, hidden_states):
        return self.out_norm(super().forward(hidden_states))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class PreNormMoE(MixtralMoE):
    """Mixtral that normalises its *input* inside the block (a LayerNorm before the router and experts):
    not a post-combine norm, so it stays eager."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2):
        super().__init__(d, f, E, k)
        self.in_norm = nn.LayerNorm(d)

    def forward(self, hidden_states):
        return super().forward(self.in_norm(hidden_states))


# ----------------------------------------------------------------------------------------------
# Capacity as training code writes it
# ----------------------------------------------------------------------------------------------

class SwitchCapacityRouter(nn.Module):
    """Switch Transformer's top-1 router as transformers writes it: argmax of the softmax, a one-hot
    mask, each sequence's tokens ranked per expert by a cumsum over the sequence dim, kept while the
    rank is within a fixed ``expert_capacity``."""

    def __init__(self, d: int, E: int, expert_capacity: int):
        super().__init__()
        self.num_experts, self.expert_capacity = E, expert_capacity
        self.classifier = nn.Linear(d, E, bias=False)

    def forward(self, hidden_states):
        router_logits = self.classifier(hidden_states)                           # [B, S, E]
        router_probs = F.softmax(router_logits, dim=-1)
        expert_index = F.one_hot(torch.argmax(router_probs, dim=-1), self.num_experts)
        token_priority = torch.cumsum(expert_index, dim=-2)                    # per sequence
        expert_index = expert_index * (token_priority <= self.expert_capacity)
        router_probs = torch.max(router_probs, dim=-1).values.unsqueeze(-1)
        return expert_index, router_probs, router_logits


class SwitchCapacityMoE(nn.Module):
    """Switch's sparse MLP: a token its expert has no room for passes through unchanged (then, like every
    token, scaled by its router probability); returns ``(y, router_logits)``."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, expert_capacity: int = 3):
        super().__init__()
        self.router = SwitchCapacityRouter(d, E, expert_capacity)
        self.experts = nn.ModuleDict({f"expert_{i}": DenseActDense(d, f) for i in range(E)})

    def forward(self, hidden_states):
        router_mask, router_probs, router_logits = self.router(hidden_states)
        next_states = hidden_states.clone()
        router_mask = router_mask.bool()
        for idx, expert in enumerate(self.experts.values()):
            token_indices = router_mask[:, :, idx]
            next_states[token_indices] = expert(hidden_states[token_indices]).to(next_states.dtype)
        return router_probs * next_states, router_logits


def top2_gating(logits, capacity_factor: float, min_capacity: int):
    """GShard's top-2 gating with dense dispatch and combine tensors ``[S, E, C]``: the second expert is the
    best of the rest, both gates normalised, then the pairs past each expert's capacity dropped (first
    choices before second choices, in token order)."""
    gates = F.softmax(logits, dim=-1)
    S, E = gates.shape
    capacity = max(math.ceil(2 * S / E * capacity_factor), min_capacity)
    mask1 = F.one_hot(torch.argmax(gates, dim=-1), E)
    mask2 = F.one_hot(torch.argmax(gates.masked_fill(mask1.bool(), float("-inf")), dim=-1), E)
    gates1_s = (gates * mask1).sum(dim=-1)
    gates2_s = (gates * mask2).sum(dim=-1)
    denom = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
    gates1_s, gates2_s = gates1_s / denom, gates2_s / denom
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    mask1 = mask1 * torch.lt(locations1, capacity)
    mask2 = mask2 * torch.lt(locations2, capacity)
    loc1 = F.one_hot(torch.sum(locations1 * mask1, dim=1), capacity)               # [S, C]
    loc2 = F.one_hot(torch.sum(locations2 * mask2, dim=1), capacity)
    combine = torch.einsum("s,se,sc->sec", gates1_s, mask1.to(gates.dtype), loc1.to(gates.dtype)) \
        + torch.einsum("s,se,sc->sec", gates2_s, mask2.to(gates.dtype), loc2.to(gates.dtype))
    return combine, combine.bool()


class DenseDispatchMoE(nn.Module):
    """GShard / fairseq style: dense ``[S, E, C]`` dispatch and combine tensors, expert inputs gathered by
    einsum into ``[E, C, d]`` buffers, stacked expert weights, the outputs combined by einsum."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, capacity_factor: float = 1.0, min_capacity: int = 4):
        super().__init__()
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.wg = nn.Linear(d, E, bias=False)
        self.wi = nn.Parameter(torch.randn(E, d, f) * d ** -0.5)
        self.wo = nn.Parameter(torch.randn(E, f, d) * f ** -0.5)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        combine, dispatch = top2_gating(self.wg(x).float(), self.capacity_factor, self.min_capacity)
        expert_in = torch.einsum("sec,sm->ecm", dispatch.to(x.dtype), x)
        h = F.relu(torch.einsum("ecm,emf->ecf", expert_in, self.wi))
        expert_out = torch.einsum("ecf,efm->ecm", h, self.wo)
        y = torch.einsum("sec,ecm->sm", combine.to(x.dtype), expert_out)
        return y.reshape(hidden_states.shape)


def fairseq_top2_gating(logits, capacity_factor: float):
    """fairseq's / DeepSpeed's top-2 gating: the second expert is the best of the rest, pairs past each expert's
    capacity dropped (first choices first), then the two gates normalised over the pairs that were kept."""
    gates = F.softmax(logits, dim=1)
    S, E = gates.shape
    capacity = math.ceil(2 * S / E * capacity_factor)
    mask1 = F.one_hot(torch.argmax(gates, dim=1), E)
    mask2 = F.one_hot(torch.argmax(logits.masked_fill(mask1.bool(), float("-inf")), dim=1), E)
    l_aux = torch.mean(torch.mean(gates, dim=0) * torch.mean(mask1.float(), dim=0)) * E * E   # first choices
    locations1 = torch.cumsum(mask1, dim=0) - 1
    locations2 = torch.cumsum(mask2, dim=0) - 1 + torch.sum(mask1, dim=0, keepdim=True)
    mask1 = mask1 * torch.lt(locations1, capacity)
    mask2 = mask2 * torch.lt(locations2, capacity)
    gates1_s = torch.einsum("se,se->s", gates, mask1.to(gates.dtype))
    gates2_s = torch.einsum("se,se->s", gates, mask2.to(gates.dtype))
    denom_s = torch.clamp(gates1_s + gates2_s, min=torch.finfo(gates.dtype).eps)
    return mask1, mask2, gates1_s / denom_s, gates2_s / denom_s, l_aux


class FairseqTop2MoE(nn.Module):
    """Top-2 gating as fairseq and DeepSpeed write it (weights normalised after the capacity drops, the balancing
    loss over the first choices), experts in an ``nn.ModuleList`` applied to the tokens each mask keeps; returns
    ``(y, l_aux)``."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, capacity_factor: float = 0.5):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.wg = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.wg(x)
        mask1, mask2, g1, g2, l_aux = fairseq_top2_gating(logits, self.capacity_factor)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (mask1[:, e] + mask2[:, e]).bool()
            if rows.any():
                gate = g1 * mask1[:, e] + g2 * mask2[:, e]
                y[rows] = y[rows] + expert(x[rows]) * gate[rows, None].to(x.dtype)
        return y.reshape(hidden_states.shape), l_aux


class ProductKeyMoE(nn.Module):
    """PEER-style retrieval experts: E rank-one experts kept as rows of two embedding tables, each token picks
    k of them through two sets of sqrt(E) keys (the best pairs of a query's two halves)."""

    def __init__(self, d: int = 16, E: int = 64, k: int = 4):
        super().__init__()
        self.num_keys, self.k = math.isqrt(E), k
        self.query = nn.Linear(d, 2 * self.num_keys, bias=False)
        self.down_embed = nn.Embedding(E, d)
        self.up_embed = nn.Embedding(E, d)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        sx, sy = self.query(x).chunk(2, dim=-1)
        (vx, ix), (vy, iy) = sx.topk(self.k, dim=-1), sy.topk(self.k, dim=-1)
        scores = (vx[:, :, None] + vy[:, None, :]).flatten(1)
        ids = (ix[:, :, None] * self.num_keys + iy[:, None, :]).flatten(1)
        top, pos = scores.topk(self.k, dim=-1)
        ids = ids.gather(1, pos)
        h = F.gelu(torch.einsum("td,tkd->tk", x, self.down_embed(ids))) * top.softmax(-1)
        return torch.einsum("tk,tkd->td", h, self.up_embed(ids)).reshape(hidden_states.shape)


class FloorCapacityMoE(nn.Module):
    """Capacity ``max(min_capacity, int(capacity_factor * T * k / E))``: truncated, not rounded up."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 8, k: int = 2, capacity_factor: float = 1.0,
                 min_capacity: int = 4):
        super().__init__()
        self.num_experts, self.top_k = E, k
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        T = x.shape[0]
        w, ids = F.softmax(self.gate(x), dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        capacity = max(self.min_capacity, int(self.capacity_factor * T * self.top_k / self.num_experts))
        slot_major = F.one_hot(ids.t().reshape(-1), self.num_experts)
        keep = (((torch.cumsum(slot_major, dim=0) - 1) * slot_major).sum(-1) < capacity).view(self.top_k, T).t()
        w = (w * keep).to(x.dtype)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where((ids == e) & keep)
            if tok.numel():
                y.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return y.reshape(hidden_states.shape)


class SequenceFirstSwitchMoE(SwitchCapacityMoE):
    """Switch's capacity on ``[S, B, d]`` inputs (Megatron and fairseq's layout): the cumsum runs over dim 0."""

    def forward(self, hidden_states):
        r = self.router
        logits = r.classifier(hidden_states)
        probs = F.softmax(logits, dim=-1)
        index = F.one_hot(torch.argmax(probs, dim=-1), r.num_experts)
        index = index * (torch.cumsum(index, dim=0) <= r.expert_capacity)
        next_states = hidden_states.clone()
        for i, expert in enumerate(self.experts.values()):
            rows = index[..., i].bool()
            next_states[rows] = expert(hidden_states[rows]).to(next_states.dtype)
        return probs.max(dim=-1, keepdim=True).values * next_states


class GroupedCapacityMoE(nn.Module):
    """Mesh-TF style: tokens cut into groups of ``group_size``, each group's experts filling separately."""

    def __init__(self, d: int = 16, f: int = 32, E: int = 4, k: int = 2, capacity_factor: float = 1.0,
                 group_size: int = 64):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor, self.group_size = E, k, capacity_factor, group_size
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(E)])

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        y = torch.zeros_like(x)
        for s in range(0, x.shape[0], self.group_size):
            g = x[s:s + self.group_size]
            T = g.shape[0]
            w, ids = F.softmax(self.gate(g), dim=-1).topk(self.top_k, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            capacity = math.ceil(self.capacity_factor * T * self.top_k / self.num_experts)
            slot_major = F.one_hot(ids.t().reshape(-1), self.num_experts)
            keep = (((torch.cumsum(slot_major, dim=0) - 1) * slot_major).sum(-1) < capacity).view(self.top_k, T).t()
            for e, expert in enumerate(self.experts):
                tok, slot = torch.where((ids == e) & keep)
                if tok.numel():
                    y[s:s + self.group_size].index_add_(0, tok, expert(g[tok]) * w[tok, slot, None])
        return y.reshape(hidden_states.shape)


# ----------------------------------------------------------------------------------------------
# Experts whose input the routing weight scales (Llama 4)
# ----------------------------------------------------------------------------------------------

class GatherScaledMoE(nn.Module):
    """Llama 4 as its reference code writes it: the router a ``[d, E]`` parameter, top-k of the raw scores,
    every expert run on every token (rows gathered per expert) whose input is scaled by the sigmoid of its
    score (-inf, so 0, where the expert was not picked); stacked ``[E, d, f]`` / ``[E, f, d]`` experts by
    ``bmm``; the experts' rows summed onto the shared expert's output with ``scatter_add``."""

    def __init__(self, d: int = 16, f: int = 24, E: int = 4, k: int = 1):
        super().__init__()
        self.num_experts, self.top_k = E, k
        self.router_DE = nn.Parameter(torch.randn(d, E) / math.sqrt(d))
        self.w1 = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
        self.w3 = nn.Parameter(torch.randn(E, d, f) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(E, f, d) / math.sqrt(f))
        self.shared_expert = GatedMLP(d, f)

    def forward(self, x):
        bsz, slen, dim = x.shape
        x_aD = x.view(-1, dim)
        a = x_aD.shape[0]
        scores_Ea = torch.matmul(x_aD, self.router_DE).transpose(0, 1)
        top_aK, idx_aK = torch.topk(scores_Ea.transpose(0, 1), self.top_k, dim=1)
        gates_Ea = torch.full_like(scores_Ea.transpose(0, 1), float("-inf")).scatter_(1, idx_aK, top_aK).transpose(0, 1)
        gates_Ea = torch.sigmoid(gates_Ea)
        rows = torch.arange(a, device=x.device).view(1, -1).expand(self.num_experts, -1).reshape(-1, 1)
        routed_in = torch.gather(x_aD, dim=0, index=rows.expand(-1, dim)) * gates_Ea.reshape(-1, 1)
        h = routed_in.view(self.num_experts, a, dim)
        h = torch.bmm(F.silu(torch.bmm(h, self.w1)) * torch.bmm(h, self.w3), self.w2)
        out_aD = self.shared_expert(x_aD)
        out_aD = out_aD.scatter_add(0, rows.expand(-1, dim), h.reshape(-1, dim))
        return out_aD.view(bsz, slen, dim)


class HashRoutedMoE(nn.Module):
    """Hash routing as DeepSeek-V4's first layers write it: each token's experts are a fixed lookup
    ``tid2eid[input_ids]`` (a ``[vocab, k]`` buffer, fixed at init), the learned gate only weighs them with
    ``sqrt(softplus(logits))`` scores, renormalised and scaled; stacked SwiGLU experts looped over, a shared
    expert added."""

    def __init__(self, d: int = 16, f: int = 24, E: int = 4, k: int = 2, vocab: int = 40):
        super().__init__()
        self.num_experts, self.top_k, self.routed_scaling_factor = E, k, 1.5
        self.gate = nn.Linear(d, E, bias=False)
        self.register_buffer("tid2eid", torch.randint(0, E, (vocab, k)))
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * f, d) / math.sqrt(d))
        self.down_proj = nn.Parameter(torch.randn(E, d, f) / math.sqrt(f))
        self.shared_experts = GatedMLP(d, f)

    def forward(self, hidden_states, input_ids=None):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores = F.softplus(self.gate(x)).sqrt()
        indices = self.tid2eid[input_ids.reshape(-1)]
        weights = scores.gather(1, indices)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.routed_scaling_factor
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * up, self.down_proj[e])
            out.index_add_(0, token, h * weights[token, slot, None])
        return (out + self.shared_experts(x)).reshape(shape)


class HashLayerMoE(nn.Module):
    """A hash layer (one expert per token, chosen by a ``[vocab]`` table of the token's id) whose output the
    router's sigmoid score for that expert scales; ModuleList experts; token ids passed positionally."""

    def __init__(self, d: int = 16, f: int = 24, E: int = 4, vocab: int = 40):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.register_buffer("hash_bin", torch.randint(0, E, (vocab,)))
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, f, bias=False), nn.ReLU(), nn.Linear(f, d, bias=False))
                                     for _ in range(E))

    def forward(self, x, tokens):
        flat = x.reshape(-1, x.shape[-1])
        expert = self.hash_bin[tokens.reshape(-1)]
        gate = torch.sigmoid(self.router(flat)).gather(1, expert[:, None])
        out = torch.zeros_like(flat)
        for e, ffn in enumerate(self.experts):
            rows = (expert == e).nonzero().squeeze(-1)
            out[rows] = ffn(flat[rows]) * gate[rows]
        return out.view_as(x)


class SqrtSoftplusMoE(nn.Module):
    """DeepSeek-V4's learned routing: ``sqrt(softplus(logits))`` scores, top-k of the scores plus a selection
    bias, the picked scores renormalised; token ids taken (the model passes them to every layer) and ignored."""

    def __init__(self, d: int = 16, f: int = 24, E: int = 6, k: int = 2):
        super().__init__()
        self.num_experts, self.top_k = E, k
        self.gate = nn.Linear(d, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.randn(E) / 10)
        self.experts = nn.ModuleList(GatedMLP(d, f) for _ in range(E))

    def forward(self, hidden_states, input_ids=None):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        scores = F.softplus(self.gate(x)).sqrt()
        idx = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.reshape(shape)
