"""Why a module that holds a router and experts is not a layer moec can call as ``forward(hidden_states)``,
in words, read from the module and its forward's signature before anything is probed: required extra
arguments, token-id arguments (routing by token, e.g. hash routing), attention beside the MoE (a whole
decoder layer). `moec.frontend.lift` asks these first.
"""
from __future__ import annotations

import inspect

from torch import nn


def is_attention(name: str, child: nn.Module) -> bool:
    """Whether a child computes attention (named or classed so)."""
    return "attention" in type(child).__name__.lower() or name.endswith(("attn", "attention"))


def attention_children(module: nn.Module) -> list:
    """``"path (Class)"`` of the module's children that compute attention (named or classed so)."""
    return [f"{name} ({type(c).__name__})" for name, c in module.named_children() if is_attention(name, c)]


def inside_a_bigger_layer(module: nn.Module, st) -> str:
    """Why a module that holds experts and a router is a whole decoder layer (attention beside the MoE: the
    MoE is a part of its forward, not all of it); "" when it is not one. (An experts module of transformers'
    experts interface inside it still runs on moec's kernels: `moec.hf.block_experts`.)"""
    attn = attention_children(module)
    if not attn:
        return ""
    return (f"its router and experts are children of a layer that also computes {attn[0]}: moec lifts a module "
            f"whose forward is the MoE layer alone")


def extra_required_args(module: nn.Module) -> list:
    """The forward's required arguments after the first (a layer moec calls as ``forward(hidden_states)``
    has none)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    req = [p.name for p in sig.parameters.values() if p.default is p.empty and p.kind in kinds]
    return req[1:]


_TOKEN_ID_ARGS = ("input_ids", "token_ids", "tokens", "ids")


def token_id_args(module: nn.Module) -> list:
    """Optional forward arguments that carry token ids (a router reading them routes by token, e.g. by hash)."""
    try:
        params = list(inspect.signature(module.forward).parameters)[1:]
    except (TypeError, ValueError):
        return []
    return [p for p in params if p in _TOKEN_ID_ARGS]
