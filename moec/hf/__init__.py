"""Hugging Face transformers integration (optional: ``import moec`` never imports transformers).

Two ways to run a transformers MoE model on moec's kernels:

1. ``moec.compile(model)``: every MoE block is lifted whole — router, dispatch, experts, combine,
   shared experts — by the generic frontend or, for blocks it cannot read, by a module adapter
   (`moec.frontend.adapters`); each lifting is confirmed by the probe. Blocks moec cannot compute
   (GPT-OSS, PhiMoE) stay eager and ``model.explain()`` says why.
2. ``experts_implementation="moec"``: transformers keeps its own router and calls moec for the
   expert computation (`moec.hf.experts.moec_experts_forward`)::

       import moec.hf
       moec.hf.register()          # also done by moec.compile once transformers is imported
       model = AutoModelForCausalLM.from_config(cfg, experts_implementation="moec")

   ``moec.hf.calls(model)`` counts how the experts modules ran (kernels, or eager and why).

And one way to run its attention as MoBA on moec's kernels: ``attn_implementation="moec_moba"``
(`moec.hf.moba_attention`; block size and top-k from the config). MoBA code a user registered as an
attention function of its own (as MoBA's package installs itself) is lifted by ``moec.compile(model)``
(`moec.hf.attention_functions`).
"""
from __future__ import annotations

from . import moba_attention
from .experts import calls, moec_experts_forward

_registered = False


def register() -> bool:
    """Register ``"moec"`` in transformers' experts interface and ``"moec_moba"`` in its attention
    interface (idempotent). Returns whether the experts interface is registered: False when
    transformers is not installed or has no experts interface."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.integrations.moe import ExpertsInterface
    except Exception:  # noqa: BLE001 - no transformers, or one without the interface
        return False
    ExpertsInterface.register("moec", moec_experts_forward)
    moba_attention.register()
    _registered = True
    return True


def is_registered() -> bool:
    return _registered


__all__ = ["register", "is_registered", "calls", "moec_experts_forward"]
