"""The experts of a transformers MoE block that moec leaves eager, on moec's kernels.

A block stays eager when its routing is none moec computes (an MLP router it cannot call, a router scoring
shared experts, PhiMoE's sparsemixer, a decoder layer holding the MoE beside attention, ...). transformers 5 splits
such a block in two: the block computes ``top_k_index``/``top_k_weights`` however it likes and calls
its experts module (``@use_experts_implementation``) as ``experts(hidden [T, d], top_k_index,
top_k_weights)``. `moec.compile` serves that experts module with the same programs as
``experts_implementation="moec"`` (`moec.hf.experts`: dispatch, gate/up/down grouped GEMMs, activation
and weighted combine as generated kernels, forward and backward): the block's routing runs as written,
the expert computation on moec's kernels.

Only a module whose own forward *is* the interface's is served (a subclass that wraps it, adding a norm
after the projections, is not: its forward would be skipped), and only while the model's
``config._experts_implementation`` is one that computes the plain maths (`SERVED`: a function registered
under another name is the user's own and runs). A call the kernels do not take runs the module's forward as
the model chose it, with the reason counted. Under ``torch.compile`` the module's own forward is traced
(dynamo sees through transformers' implementations; a served call would be an opaque graph break).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .experts import ExpertsRegion, interface_forward, serve

# transformers' implementations of the experts call that compute its plain maths (None: the default)
SERVED = (None, "eager", "grouped_mm", "batched_mm", "moec")


def follows_interface(m: nn.Module) -> bool:
    """Whether ``m``'s forward is transformers' experts-interface dispatch (``@use_experts_implementation``),
    not a subclass's forward around it (compiled or not)."""
    cls = getattr(type(m), "_moec_base", type(m))
    fwd = interface_forward(cls)
    return fwd is not None and cls.forward is fwd and hasattr(m, "config")


@dataclass(eq=False)
class BlockExperts(ExpertsRegion):
    """The region of an experts module whose block (``block``, eager because ``block_reason``) routes."""

    block: str = ""
    block_reason: str = ""
    takes_any_call = True           # it binds the call to the interface's signature itself (`__call__`)

    def __call__(self, module: nn.Module, eager, *args, **kwargs):
        got = _routed_call(type(module)._moec_base, module, args, kwargs)
        if got is None:
            return self.eager("a call other than experts(hidden_states, top_k_index, top_k_weights)",
                              eager, *args, **kwargs)
        impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
        why = None if impl in SERVED else f"the model's own experts_implementation {impl!r}"
        return serve(self, module, eager, *got, reason=why)

    def report(self, qualname: str, cls: str) -> list[str]:
        where = self.block or "<root>"
        head = (f"EXPERTS {qualname} ({cls}): transformers' experts interface, served by moec's experts kernels "
                f"where they apply (calls below); the routing stays {where}'s own code")
        lines = self.call_lines() + self.program_lines()
        return [head] + [f"  {line}" for line in lines]


_SIGNATURES: dict = {}


def _routed_call(cls: type, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``(hidden_states, top_k_index, top_k_weights)`` of a call, or None when it passes anything else."""
    if len(args) == 3 and not kwargs:
        return args
    sig = _SIGNATURES.get(cls)
    if sig is None:
        sig = _SIGNATURES[cls] = inspect.signature(cls.forward)
    try:
        bound = sig.bind(module, *args, **kwargs)
    except (TypeError, ValueError):
        return None
    values = list(bound.arguments.values())[1:]
    return tuple(values) if len(values) == 3 else None


def attach(model: nn.Module, skipped: list, arch=None, dump_dir=None) -> list:
    """``[(qualname, module, region)]`` for each experts module under an eager block of ``model`` (``skipped``:
    ``(block qualname, class name, reason)``) that follows transformers' experts interface; the caller makes
    each module's forward call its region."""
    found, seen = [], set()
    for q, _, reason in skipped:
        block = model.get_submodule(q) if q else model
        for sub, m in block.named_modules():
            if id(m) in seen or not follows_interface(m):
                continue
            seen.add(id(m))
            qualname = ".".join(p for p in (q, sub) if p)
            region = BlockExperts((qualname.replace(".", "_") or "root") + "_experts", arch=arch, dump_dir=dump_dir,
                                  block=q, block_reason=reason)
            found.append((qualname, m, region))
    return found


__all__ = ["BlockExperts", "attach", "follows_interface"]
