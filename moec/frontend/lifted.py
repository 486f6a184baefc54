"""What `lift` hands back: a `LiftedMoE` (spec + how to read the weights) or a `NotLifted` reason.

The weights are described as data, not closures: `ParamTensors` names the leaf tensors the layer
reads (by qualified attribute path, resolved afresh on every call, so `.half()`, `.to(device)` and
in-place updates are always seen), and `WeightsRecipe` says how each `MoEWeights` field is built
from those tensors with differentiable views only (stack, transpose, row slices).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..spec import MoESpec, MoEWeights
from .router_call import ProbedModule
from .token_table import TokenIds

@dataclass
class LiftedMoE:
    """A recognised MoE layer, confirmed by the probe against the module's own forward.

    - ``spec``: what the layer computes (see `moec.spec`).
    - ``formulation``: how the eager code is written ("module-list loop", "stacked 3-D weights,
      ...", "dense one-hot"); informational.
    - ``param_tensors(module)``: the leaf tensors (parameters/buffers) the layer reads, fixed order.
    - ``weights(tensors)``: `MoEWeights` from those tensors; differentiable.
    - ``outputs``: what forward returns, its items' kinds joined by ``_``: ``"y"`` (y shaped like the
      input), ``"y_logits"`` (y, router logits ``[T, E]``), ``"y_aux"`` (y, load-balancing loss),
      ``"y_weights"`` (y, routing weights ``[T, k]`` in slot order: GPT-OSS), ``"y_aux_zloss"``...
      (`moec.frontend.outputs`); ``container``: the tuple, list or namedtuple class they come in
      (None: y alone); ``out_dtypes``: per item, ``"x"`` (the input's dtype), a dtype, or None;
      ``out_leads``: per item, whether it keeps the input's leading dims (``[B, S, E]`` logits); ``y_flat``:
      y comes back as ``[T, d]`` whatever the input's leading dims (Llama4's blocks).
    - ``noise_dtype``: for noisy gating, the dtype eager draws ``randn_like`` in (at lift time).
    - ``notes``: human-readable facts for ``explain()``.
    - ``eager_in``: ``{training: reason}`` for a mode the probe could not confirm (router jitter applied
      in training only, a forward that writes into its input in one mode): calls in that mode run eager.
    - ``observed``: paths of child modules (the router) that the eager forward calls and that
      others may watch with forward hooks (Hugging Face records router logits this way); when
      one of them has hooks, the compiled forward calls it on the ``[T, d]`` input (result
      discarded) so the hooks still see its output.
    - ``observed_calls``: for an observed router that takes more than the hidden states, how the
      forward calls it (`moec.frontend.router_call`; None: it cannot be called the same way, and a
      call with hooks on it runs eager).
    - ``post``: the path of a child module (a norm of the layer's output) the forward applies to the
      combined output before returning it; the compiled layer calls it on the kernels' output.
    - ``idle_experts``: ``{tensor index: expert}`` when the eager backward leaves the parameters of
      experts no token reached without a gradient (`moec.frontend.idle_experts`); the compiled
      backward then does too.
    - ``router_module``: an external router's path (`moec.spec.MoESpec.external_router`): the child the
      compiled forward calls, as the eager forward does, for the logits the kernels route.
    - ``shared_module``: an external shared expert's path (`moec.spec.MoEWeights.shared`): the child the
      compiled forward calls, as the eager forward does, and adds to the kernels' output.
    - ``external_calls``: for each external child, how the forward calls it (its arguments:
      `moec.frontend.router_call.external_call`), so the compiled call passes the same.
    - ``token_ids``: for a layer that routes by token id (`moec.spec.RouterConfig.token_table`), the forward's
      token-id argument and the table it indexes (`moec.frontend.token_table.TokenIds`).
    - ``ignored_args``: arguments the compiled call may be given and drops: token ids a layer that does not
      route by them takes (`moec.frontend.token_table.ignores_tokens`).
    """

    spec: MoESpec
    formulation: str
    param_tensors: Callable[[nn.Module], list[Tensor]]
    weights: Callable[[Sequence[Tensor]], MoEWeights]
    outputs: str
    noise_dtype: Optional[torch.dtype] = None
    notes: list[str] = field(default_factory=list)
    container: Optional[type] = None
    out_dtypes: tuple = ()
    out_leads: tuple = ()
    y_flat: bool = False
    observed: tuple[str, ...] = ()
    observed_calls: dict = field(default_factory=dict)
    idle_experts: dict = field(default_factory=dict)
    post: Optional[str] = None          # a child (a norm) the forward applies to the combined output: run after
    eager_in: dict = field(default_factory=dict)
    router_module: Optional[str] = None
    shared_module: Optional[str] = None
    external_calls: dict = field(default_factory=dict)    # path -> how the forward calls that external child
    token_ids: Optional[TokenIds] = None
    ignored_args: tuple = ()            # forward arguments (token ids) the probe found it returns the same without

    def read_weights(self, module: nn.Module, training: bool) -> MoEWeights:
        """The layer's `MoEWeights` from ``module``'s current tensors, with its external router and shared expert
        (if any) called as the probe calls them in ``training`` mode (`with_children`)."""
        w = with_children(self.weights(self.param_tensors(module)), module, self.router_module,
                          self.shared_module, self.external_calls, training)
        if self.token_ids is not None:
            w.token_table = self.token_ids.rows(module)
        return w


def with_children(w: MoEWeights, module: nn.Module, router: Optional[str], shared: Optional[str], calls: dict,
                  training: bool, seed: int = 0, shape=None) -> MoEWeights:
    """``w`` with the children of ``module`` at ``router`` and ``shared`` as its external router and shared expert
    (`MoEWeights.router`, ``shared``; None: none), called as the forward calls them (``calls``: path -> how,
    `moec.frontend.router_call.external_call`) the way the probe calls eager code (`ProbedModule`: ``training``
    mode, ``seed``, for an input of ``shape``): the frontend's calls never change the module."""
    if router is not None:
        w.router = ProbedModule(module, router, calls[router], training, seed, shape)
    if shared is not None:
        w.shared = ProbedModule(module, shared, calls[shared], training, seed, shape)
    return w


@dataclass
class NotLifted:
    """A module that looks like (or was asked to be) an MoE layer but is not lifted; ``reason`` says why."""

    reason: str


def resolve(module: nn.Module, path: str) -> Tensor:
    """The tensor at a dotted attribute path (``experts.0.w1.weight``)."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Tensor):
        raise TypeError(f"{path} is a {type(obj).__name__}, not a tensor")
    return obj


@dataclass(frozen=True)
class ParamTensors:
    """``module -> [tensor at each path]``, resolved on every call."""

    paths: tuple[str, ...]

    def __call__(self, module: nn.Module) -> list[Tensor]:
        return [resolve(module, p) for p in self.paths]


@dataclass(frozen=True)
class Src:
    """One `MoEWeights` field from leaf tensors: optionally stack several along a new dim 0,
    optionally view it as ``view`` (e.g. ``[E*f, d]`` as ``[E, f, d]``), optionally swap the
    last two dims, optionally keep rows ``start:stop:step`` of dim -2 and columns of dim -1
    (GPT-OSS interleaves gate and up: gate = ``gate_up[..., 0::2]``)."""

    indices: tuple[int, ...]
    stack: bool = False
    transpose: bool = False
    rows: Optional[tuple[int, int, int]] = None
    view: Optional[tuple[int, ...]] = None
    cols: Optional[tuple[int, int, int]] = None

    def build(self, ts: Sequence[Tensor], stacked: Optional[Tensor] = None) -> Tensor:
        """The field from the leaf tensors ``ts``; ``stacked``: the stack of ``ts[indices]`` when the
        caller keeps one (a storage those tensors are views of), instead of a fresh copy."""
        if self.stack:
            t = stacked if stacked is not None else torch.stack([ts[i] for i in self.indices])
        else:
            t = ts[self.indices[0]]
        if self.view is not None:
            t = t.view(self.view)
        if self.transpose:
            t = t.transpose(-1, -2)
        if self.rows is not None:
            t = t[..., slice(*self.rows), :]
        if self.cols is not None:
            t = t[..., slice(*self.cols)]
        return t

    def describe(self, paths: Sequence[str]) -> str:
        if self.stack:
            names = [paths[i] for i in self.indices]
            text = f"stack({_pattern(names)})"
        else:
            text = paths[self.indices[0]]
        if self.view is not None:
            text += f".view({', '.join(map(str, self.view))})"
        if self.transpose:
            text += ".mT"
        if self.rows is not None:
            a, b, c = self.rows
            text += f"[{a}:{b}" + (f":{c}" if c != 1 else "") + "]"
        if self.cols is not None:
            a, b, c = self.cols
            text += f"[..., {a}:{b}" + (f":{c}" if c != 1 else "") + "]"
        return text


def _pattern(names: list[str]) -> str:
    """``experts.0.w1.weight, experts.1.w1.weight`` -> ``experts.*.w1.weight``."""
    split = [n.split(".") for n in names]
    if len({len(s) for s in split}) == 1:
        parts = [p[0] if len(set(p)) == 1 else "*" for p in zip(*split)]
        if parts.count("*") == 1:
            return ".".join(parts)
    return ", ".join(names)


@dataclass(frozen=True)
class WeightsRecipe:
    """``tensors -> MoEWeights``: each field (by name) built by a `Src`."""

    fields: tuple[tuple[str, Src], ...]

    def __call__(self, tensors: Sequence[Tensor], stacks: Optional[dict] = None) -> MoEWeights:
        """``stacks``: ``{indices: tensor}`` of stacks the caller keeps (see `Src.build`)."""
        stacks = stacks or {}
        return MoEWeights(**{"w_router": None,     # an external router has none
                             **{name: src.build(tensors, stacks.get(src.indices)) for name, src in self.fields}})

    @property
    def stacked(self) -> list[tuple[int, ...]]:
        """The index tuples of the leaf tensors some field stacks (each once)."""
        return list(dict.fromkeys(src.indices for _, src in self.fields if src.stack))

    def describe(self, paths: Sequence[str]) -> list[str]:
        return [f"{name} = {src.describe(paths)}" for name, src in self.fields]

    def readers(self) -> dict[int, list[str]]:
        """``{leaf tensor index: the fields built from it}``."""
        got: dict[int, list[str]] = {}
        for name, src in self.fields:
            for i in src.indices:
                got.setdefault(i, []).append(name)
        return got

    def partitions(self, i: int, shapes: Sequence[tuple]) -> bool:
        """Whether the fields built from leaf tensor ``i`` (of the leaf tensors' ``shapes``) read each of its
        elements exactly once: then the gradients of those fields, written into views of one buffer laid out
        like the tensor (or like the stack it belongs to), are its whole gradient with nothing to add up
        (`grad_views`)."""
        srcs = [src for _, src in self.fields if i in src.indices]
        first = srcs[0]
        if any((s.indices, s.stack, s.view, s.transpose) != (first.indices, first.stack, first.view, first.transpose)
               for s in srcs) or (not first.stack and len(first.indices) != 1):
            return False
        shape = self._frame(first, shapes)
        if not shape:
            return len(srcs) == 1
        rows, cols = (shape[-2], shape[-1]) if len(shape) > 1 else (1, shape[0])

        def span(sl, n):
            return set(range(n)[slice(*sl)]) if sl is not None else set(range(n))
        boxes = [(span(s.rows, rows), span(s.cols, cols)) for s in srcs]
        if sum(len(r) * len(c) for r, c in boxes) != rows * cols:
            return False
        return all(not (boxes[a][0] & boxes[b][0]) or not (boxes[a][1] & boxes[b][1])
                   for a in range(len(boxes)) for b in range(a))

    @staticmethod
    def _frame(src: Src, shapes: Sequence[tuple]) -> tuple:
        """The shape ``src`` slices its rows and columns in (after its stack, view and transpose), given the leaf
        tensors' ``shapes``."""
        t = tuple(shapes[src.indices[0]])
        shape = (len(src.indices), *t) if src.stack else t
        if src.view is not None:
            shape = tuple(src.view)
        if src.transpose:
            shape = (*shape[:-2], shape[-1], shape[-2])
        return shape

    def grad_views(self, names: Sequence[str], buffers: Sequence[Optional[Tensor]], stacks: dict) -> dict:
        """``{field: view}`` for the fields ``names``, built from gradient ``buffers`` (one per leaf tensor, laid out
        like it) as the fields are built from the tensors, with ``stacks`` (``{indices: buffer}``) for stacked
        ones: the views a backward writes each field's gradient into."""
        return {name: src.build(buffers, stacks.get(src.indices)) for name, src in self.fields if name in names}
