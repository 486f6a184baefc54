"""Training through generated forward kernels: the forward runs the kernels, the backward is autograd
through an eager reference of the same function on the saved inputs (exact gradients, eager speed).
Every entry point uses it: compiled modules through `KernelsForward`, the ``torch.library`` ops
through `reference_grads` in their registered backward."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def reference_grads(reference: Callable, tensors: Sequence, needs: Sequence[bool], grads: Sequence) -> list:
    """The gradient of ``reference(tensors)`` (a sequence of outputs) with respect to each
    ``tensors[i]`` for which ``needs[i]`` (None elsewhere), given the outputs' gradients ``grads``."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) if isinstance(t, torch.Tensor) else t
                  for t, n in zip(tensors, needs)]
        outs = reference(leaves)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o is not None and o.requires_grad]
        wanted = [t for t, n in zip(leaves, needs) if n and t is not None]
        got = (torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
               if pairs and wanted else [None] * len(wanted))
    it = iter(got)
    return [next(it) if n and t is not None else None for t, n in zip(leaves, needs)]


class KernelsForward(torch.autograd.Function):
    """``KernelsForward.apply(kernels, reference, keep, *tensors)``: ``kernels(tensors)`` (detached) gives
    the outputs; the backward is `reference_grads` of ``reference(tensors, kept)``, where ``kept`` are
    the forward's outputs at the positions ``keep`` (e.g. MoBA's selected blocks: the backward attends
    over the blocks the kernels chose). ``tensors`` may hold None; integer outputs get no gradient.
    ``reference.no_grad_for(tensors)``, when present, names positions whose gradient is None."""

    @staticmethod
    def forward(ctx, kernels, reference, keep, *tensors):
        outs = tuple(kernels([t.detach() if t is not None else None for t in tensors]))
        ctx.reference, ctx.n_kept = reference, len(keep)
        ctx.present = [t is not None for t in tensors]
        ctx.save_for_backward(*[t for t in tensors if t is not None], *[outs[i] for i in keep])
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        kept = saved[len(saved) - ctx.n_kept:]
        it = iter(saved[:len(saved) - ctx.n_kept])
        tensors = [next(it) if p else None for p in ctx.present]
        got = reference_grads(lambda ts: ctx.reference(ts, kept), tensors, ctx.needs_input_grad[3:], grads)
        for i in getattr(ctx.reference, "no_grad_for", lambda ts: ())(tensors):
            got[i] = None            # as the eager backward leaves them (e.g. experts no token reached)
        return (None, None, None, *got)
