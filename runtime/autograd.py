"""Training through generated kernels: `KernelsBoth` runs generated kernels forward and backward (MoE
layers, their routed experts and MoBA cores: `moec.ir.backward`). `reference_grads` is the fallback of
the ``torch.library`` ops where the kernels do not apply: autograd through an eager reference of the
same function on the saved inputs."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable


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


class KernelsBoth(torch.autograd.Function):
    """``KernelsBoth.apply(forward, backward, no_grad_for, *tensors)``: generated kernels both ways.
    ``forward(tensors)`` (detached) gives ``(outputs, saved)`` (``saved``: ``{name: tensor}`` the backward
    reads, e.g. the routing); ``backward(tensors, saved, grads, needs)`` the gradient of each tensor, from the
    outputs' gradients ``grads`` (None for an output autograd has no gradient for, not zeros).
    ``no_grad_for(tensors)`` (or None) names positions whose gradient is None, as the eager backward
    leaves them (experts no token reached). The backward is once differentiable: differentiating it
    again (``create_graph=True`` and a second ``grad``) raises rather than giving zeros."""

    @staticmethod
    def forward(ctx, forward, backward, no_grad_for, *tensors):
        outs, saved = forward([t.detach() if t is not None else None for t in tensors])
        outs = tuple(outs)
        ctx.fns, ctx.saved_names = (backward, no_grad_for), tuple(saved)
        ctx.present = [t is not None for t in tensors]
        ctx.save_for_backward(*[t for t in tensors if t is not None], *saved.values())
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @once_differentiable           # the kernels' gradients carry no graph: a second derivative is an error
    def backward(ctx, *grads):
        backward, no_grad_for = ctx.fns
        stored = ctx.saved_tensors
        n_saved = len(ctx.saved_names)
        saved = dict(zip(ctx.saved_names, stored[len(stored) - n_saved:]))
        it = iter(stored[:len(stored) - n_saved])
        tensors = [next(it) if p else None for p in ctx.present]
        needs = ctx.needs_input_grad[3:]
        got = [g if n else None for g, n in zip(backward(tensors, saved, grads, needs), needs)]
        for i in no_grad_for(tensors) if no_grad_for is not None else ():
            got[i] = None
        return (None, None, None, *got)
