"""The backward of a lifted MoE layer's call: the generated backward program (`moec.compiler.BackwardRecipe`) of
the lift the forward ran, run for the gradients autograd wants, with the weights' gradients written into buffers
laid out like the user's tensors.

Where the gradients land (`_grad_layout`): a tensor needing a gradient whose fields (`WeightsRecipe.readers`)
all have one and read each of its elements once (`WeightsRecipe.partitions`) gets a buffer laid out like it
(members of a stacked ModuleList: slices of one stacked buffer), and the kernels write each field's gradient
straight into its view of those buffers (`Program.run(into=...)`): nothing is stacked, sliced or scattered
afterwards. Autograd then hands each buffer to the parameter (adding it to an existing ``.grad``, running hooks
and DDP's reducer as for any gradient). A binding that does not partition its tensor maps gradients back through
autograd of the binding instead.
"""
from __future__ import annotations

import functools

import torch

from moec.ir.backward import PRE_SAVED, grad_outputs
from moec.ir.build import graph_input, moe_inputs

from .compiler import BackwardRecipe, MoERecipe
from .frontend.outputs import kernel_outputs
from .spec import MoEWeights


def kernels_backward(region, lifted, ts, saved, grads, needs, w: MoEWeights, training, noise) -> list:
    """The gradients of ``x2, *tensors`` of a call of ``region`` (`moec.moe_region.MoERegion`) from the generated backward (`BackwardRecipe`) of the call's
    lift ``lifted``, for the gradients ``grads`` of its outputs (None: that output is not used, zero).
    Only the kernels the wanted gradients need run (frozen experts: no weight-gradient kernels); tensors
    the used outputs do not depend on keep no gradient, as in eager (the experts when only the aux loss
    or the router logits are used, the noise projection outside training). An external router's logits
    (`moec.spec.MoESpec.external_router`) come last in ``ts``; their gradient goes back through autograd."""
    external = lifted.spec.external_router
    outputs = kernel_outputs(lifted.outputs, external)
    recipe = MoERecipe(lifted.spec, outputs)
    got = dict(zip(outputs, grads))
    region._count("backward: kernels")
    x2 = ts[0]
    bw = region.compiled_for(BackwardRecipe(recipe, tuple(r for r in PRE_SAVED if r in saved)), x2.dtype, x2.device)
    inputs = moe_inputs(x2, w, ts[-1] if external else None)
    zeros = {"y": lambda: torch.zeros_like(x2), "aux": lambda: x2.new_zeros((), dtype=torch.float32),
             "logits": lambda: x2.new_zeros((x2.shape[0], lifted.spec.num_experts), dtype=torch.float32),
             "weights": lambda: x2.new_zeros((x2.shape[0], lifted.spec.router.top_k), dtype=torch.float32)}
    names = {"y": "dy", "aux": "d_aux", "logits": "d_logits", "weights": "d_weights_out"}
    for o in outputs:
        inputs[names[o]] = got[o] if got[o] is not None else zeros[o]()
    inputs.update(saved)
    unused = set() if noise is not None else {"w_noise"}
    if got.get("y") is None:            # only the router's outputs are used: no expert gets a gradient
        unused |= {f for f in grad_outputs(bw.graph) if f not in ("x", "w_router", "b_router", "w_noise", "logits")}
    value_of = {f: v for f, v in zip(grad_outputs(bw.graph), bw.graph.outputs) if f not in unused}
    last = len(ts) - 1 if external else len(ts)
    tensors, wanted = ts[1:last], needs[1:last]
    direct, buffers, into = _grad_layout(lifted.weights, tensors, wanted, value_of, bw.graph)
    # the rest (a tensor two fields read overlapping parts of, ...): autograd of the lift's weight binding
    # (stacks, slices, transposes) maps each weight's gradient onto the tensors it was read from
    leaves = [t.detach().requires_grad_(bool(n) and i not in direct) for i, (t, n) in enumerate(zip(tensors, wanted))]
    with torch.enable_grad():          # only the weight binding's graph, for the tensors not written directly
        named = moe_inputs(x2, lifted.weights(leaves)) if any(t.requires_grad for t in leaves) else {}
    later = [(f, v) for f, v in value_of.items() if f in named and named[f].requires_grad]
    needed = [v for f, v in value_of.items() if (f == "x" and needs[0]) or (f == "logits" and needs[-1])] + \
        list(into) + [v for _, v in later]
    with torch.no_grad():              # the kernels' (and the router's torch) gradients carry no graph
        env = region.run(bw, {n: inputs[n] for n, _ in bw.graph.inputs}, training=training, noise=noise,
                       needed=tuple(needed), into=into, values=True)
    sources = [t for t in leaves if t.requires_grad]
    out = torch.autograd.grad([named[f] for f, _ in later], sources,
                              [env[v].to(named[f].dtype) for f, v in later], allow_unused=True) \
        if later and sources else [None] * len(sources)
    it = iter(out)
    got = [env[value_of["x"]].to(x2.dtype) if needs[0] and "x" in value_of else None]
    got += [buffers[i] if i in direct else next(it) if t.requires_grad else None for i, t in enumerate(leaves)]
    for i in idle(lifted, inputs["ids"]):
        got[i] = None           # as the eager backward leaves them
    if external:
        got.append(env[value_of["logits"]] if needs[-1] and "logits" in value_of else None)
    return got


def idle(lifted, ids: torch.Tensor) -> list:
    """Positions (in ``x2, *tensors``) of the parameters of experts the routing ``ids`` (the forward's)
    reached no token with, when the eager backward leaves those without a gradient
    (`LiftedMoE.idle_experts`)."""
    if not lifted.idle_experts:
        return []
    hit = set(ids.unique().tolist())
    return [1 + i for i, e in lifted.idle_experts.items() if e not in hit]


def _grad_layout(recipe, tensors, wanted, value_of: dict, bw) -> tuple[set, list, dict]:
    """Where the backward writes the weights' gradients: ``(direct, buffers, into)``. A tensor needing a gradient
    whose fields (`WeightsRecipe.readers`) all have one and read each of its elements once (`partitions`) is
    ``direct``: its gradient is a buffer laid out like it (members of a stacked ModuleList: views of one stacked
    buffer), and ``into`` (``{backward value: view}``) makes the kernels write each field's gradient straight into
    its view of those buffers, in the parameter's own layout (transposed, fused gate_up halves, interleaved
    rows): nothing is stacked, sliced or scattered afterwards. Autograd then hands each buffer to the
    parameter (adding it to an existing ``.grad``, running hooks and DDP's reducer as for any gradient)."""
    readers = recipe.readers()
    shapes = tuple(tuple(t.shape) for t in tensors)
    ok = {i for i, fields in readers.items()
          if all(f in value_of and bw.types[value_of[f]].torch_dtype == tensors[i].dtype for f in fields)
          and _partitions(recipe, i, shapes)}
    groups = [src.indices for _, src in recipe.fields]
    direct = {i for i in ok if wanted[i] and all(j in ok for g in groups if i in g for j in g)}
    buffers: list = [None] * len(tensors)
    stacks = {}
    for idx in recipe.stacked:
        if direct & set(idx):
            t = tensors[idx[0]]
            stacks[idx] = torch.empty((len(idx), *t.shape), dtype=t.dtype, device=t.device)
            for j, i in enumerate(idx):
                buffers[i] = stacks[idx][j]
    for i in direct:
        if buffers[i] is None:
            buffers[i] = torch.empty_like(tensors[i])
    held = {i for i, b in enumerate(buffers) if b is not None}
    fields = [f for f, src in recipe.fields if set(src.indices) <= held and f in value_of]
    into = {value_of[f]: graph_input(f, v) for f, v in recipe.grad_views(fields, buffers, stacks).items()}
    return direct, buffers, into


@functools.lru_cache(maxsize=256)
def _partitions(recipe, i: int, shapes: tuple) -> bool:
    return recipe.partitions(i, shapes)
