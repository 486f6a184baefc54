"""Which experts' parameters the eager backward leaves without a gradient.

Code that calls only the experts some token was routed to (``for e in expert_hit: ...``, or ``if not
tokens.numel(): continue``) leaves ``.grad`` of the other experts' parameters ``None`` after a
backward, where code that calls every expert (an empty batch for the idle ones) gives them zeros. The
difference shows in training: optimizers skip a ``None`` gradient but step a zero one (AdamW decays
the weight, momentum moves it). `idle_expert_grads` finds out which way the module's own code goes by
running its forward once on one token with autograd on and reading which parameters its graph reaches
(no backward: users' gradient hooks do not fire, ``.grad`` is not touched), and returns ``{tensor index: expert}`` for `LiftedMoE.param_tensors` when idle experts get ``None``
(empty when they get zeros, or when the experts are one stacked tensor).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from .. import reference
from .probe_harness import hooks_off, mode, seeded
from .token_table import probe_tokens

_EXPERT_FIELDS = ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")


def _expert_of(lifted) -> dict:
    """``{tensor index: expert}`` for tensors that are one expert's (stacked ModuleList weights)."""
    got = {}
    for name, src in lifted.weights.fields:
        if name in _EXPERT_FIELDS and src.stack:
            for e, i in enumerate(src.indices):
                got[i] = e
    return got


def hit_experts(x2: torch.Tensor, w, spec, group_size=None, tokens=None) -> set:
    """The experts the rows ``x2 [T, d]`` (sequences of ``group_size``; ``tokens``: their ids, for a token table)
    are routed to (noise-free routing)."""
    with torch.no_grad():
        logits = reference.logits_of(x2, w)
        choices = reference.table_choices(w.token_table, tokens) if spec.router.token_table else None
        return set(reference.route(logits, spec.router, w.score_bias, group_size, choices)[0].flatten().tolist())


def _reached(root) -> set:
    """ids of the leaf tensors the autograd graph of ``root`` accumulates into (no backward is run, so
    no gradient hook of the user's fires)."""
    seen, todo, leaves = set(), [root], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        todo += [f for f, _ in fn.next_functions]
    return leaves


def idle_expert_grads(module: nn.Module, lifted, training: bool) -> dict:
    expert_of = _expert_of(lifted)
    E, k = lifted.spec.num_experts, lifted.spec.router.top_k
    if not expert_of or k >= E or lifted.spec.router.noisy:
        return {}
    tensors = lifted.param_tensors(module)
    if not all(isinstance(tensors[i], nn.Parameter) for i in expert_of):
        return {}           # (the router's buffers, e.g. a selection bias, may be plain tensors)
    device = tensors[0].device
    dtype = tensors[next(iter(expert_of))].dtype     # the experts' (a router may be kept in fp32)
    forward = type(module)._moec_base.forward if hasattr(type(module), "_moec_base") else type(module).forward
    if any(tensors[i].is_inference() for i in expert_of):
        return {}           # inference tensors never get a gradient
    # the probe asks what the code does whichever experts are frozen now (a frozen tensor gets None either way;
    # one frozen expert must not decide for the others, nor later unfreezing): it runs on leaves that view the
    # experts' tensors and require grad (swapped in as `torch.func.functional_call` does, around the module's own
    # forward), so the user's tensors are never changed
    paths = lifted.param_tensors.paths
    leaves = {paths[i]: tensors[i].detach().requires_grad_(True) for i in expert_of}
    for shape in ((1, 1, lifted.spec.hidden), (1, lifted.spec.hidden)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
        ids = lifted.token_ids
        tokens = probe_tokens(shape[:-1], ids.vocab, 5, device) if ids is not None else None
        try:
            with mode(module, training), seeded(device, 11), hooks_off(module), torch.enable_grad(), \
                    _reparametrize_module(module, leaves):
                out = forward(module, x, **({ids.arg: tokens} if ids is not None else {}))
            y = out[0] if isinstance(out, (tuple, list)) else out
            reached = _reached(y.grad_fn)
            break
        except Exception:  # noqa: BLE001 - the other input rank, or no answer (zeros, as before)
            continue
    else:
        return {}
    hit = hit_experts(x.reshape(-1, x.shape[-1]), lifted.read_weights(module, training), lifted.spec,
                      x.shape[-2] if x.dim() > 2 else None, tokens)
    idle = [i for i, e in expert_of.items() if e not in hit]
    busy = [i for i, e in expert_of.items() if e in hit]
    if idle and all(id(leaves[paths[i]]) not in reached for i in idle) \
            and all(id(leaves[paths[i]]) in reached for i in busy):
        return expert_of
    return {}
