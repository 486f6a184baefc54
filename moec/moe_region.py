"""A lifted MoE layer at run time: validate the call, bind weights, run kernels, pack outputs.

Weights are read where the module keeps them, at every call: views of its parameters (stacked 3-D
expert tensors, transposes, column slices), and for experts kept as separate modules one stacked
storage that their parameters are made views of (`share_storage`: each parameter keeps its identity,
only its ``.data`` moves), so every write to a parameter — optimizer steps, ``.data`` writes,
``copy_`` under ``no_grad``, ``load_state_dict`` — lands where the kernels read, and nothing is
copied per call. A parameter that no longer views the stack (replaced, or moved by ``.to()`` /
``.half()``) is noticed by its address and the stack is rebuilt, once.

Every call first checks what the lift relied on (`moec.guards`): when an attribute, a submodule, a
class or a forward changed since, the region lifts the module again for its new state (a state seen
before reuses its lift) or, when the new state is not liftable, runs eager; `explain()` lists each
change and what it led to. Forward hooks on modules inside the layer run only in its eager forward,
so a hooked layer runs eager for that call; the router's hooks are the exception when its output is
all they read (transformers records router logits that way): the compiled call runs the router once,
with its hooks, and uses the kernels only if the hooks left the router's output unchanged.

A call the kernels cannot serve (an unsupported dtype or device, bf16 under the CPU
interpreter, moec disabled) runs the module's own eager forward, and the region counts why,
so `explain()` can say it. When gradients are needed, the forward runs the kernels and saves the
routing, and the backward runs generated kernels too (`moec.moe_backward`, `moec.ir.backward`, `KernelsBoth`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import functools
from collections import Counter, OrderedDict

import torch

from moec.ir.backward import read_saved
from moec.ir.build import moe_inputs
from moec.passes.save_activations import choice_for
from moec.runtime.autograd import KernelsBoth
from moec.runtime import launch, tune_file
from moec.runtime.graphs import GraphCache, graph_key, not_capturable
from moec.runtime.support import why_not_kernels

from . import guards
from .compiler import MoERecipe
from .frontend import lift
from .frontend.outputs import derive, item_dtype, item_shape, kernel_outputs, pack, slots
from .frontend.router_call import arguments, own_forward
from .frontend.token_table import CallChoices
from .moe_backward import kernels_backward
from .region import Region, empty_with_grad, is_disabled
from .router_hooks import call_observed
from .spec import MoEWeights

@dataclass(eq=False)
class MoERegion(Region):
    """One lifted MoE module. ``lifted`` is the frontend's `LiftedMoE`."""

    lifted: object = None                       # the lift of the current state (None: not liftable, see `unlifted`)
    lift_dtype: Optional[torch.dtype] = None    # the layer's dtype when it was lifted
    state: tuple = ()                           # the `guards` state `lifted` was made for
    unlifted: str = ""                          # why the current state is not liftable
    guard_changes: Counter = field(default_factory=Counter)   # "what changed -> what it led to": count
    _lifts: OrderedDict = field(default_factory=OrderedDict)  # state -> lift (or the reason it has none)
    _guard: Optional[guards.Guard] = None       # checks the current state cheaply
    _lifting: bool = False                      # inside `_switch`: the probe's calls run eager, uncounted
    _stacks: dict = field(default_factory=dict)   # stacked indices -> (stack, its members' addresses)
    _kept: Optional["_Kept"] = None               # the weights of the last call, while its tensors hold
    _owners: Optional[list] = None              # (module, name) of each tensor the lift reads (see `tensors`)
    _observed: Optional[list] = None            # (path, module) of the observed children (see `moec.router_hooks`)
    _outputs: Optional[tuple] = None            # (lift, its program's outputs)
    _program: Optional[tuple] = None            # (lift, saving, dtype, device, compiled): the last call's
    _call_choices: Optional[CallChoices] = None   # a token table's rows for a call's token ids
    graph_skips: Counter = field(default_factory=Counter)   # mode="reduce-overhead": why a call took no graph

    MAX_LIFTS = 8                               # states remembered (least recently used dropped)

    @property
    def spec(self):
        return self.lifted.spec

    @property
    def outputs(self) -> tuple[str, ...]:
        """The program's outputs (the forward's other items are derived from them: `pack`)."""
        if self._outputs is None or self._outputs[0] is not self.lifted:
            self._outputs = (self.lifted, kernel_outputs(self.lifted.outputs, self.spec.external_router))
        return self._outputs[1]

    @property
    def recipe(self) -> MoERecipe:
        return MoERecipe(self.spec, self.outputs)

    def tensors(self, module) -> list:
        """The leaf tensors the lift reads (`LiftedMoE.param_tensors`), looked up in the modules that own
        them: while the guard holds the module tree is the one they were found in."""
        if self._owners is None:
            self._owners = [(next((d for d in (owner._parameters, owner._buffers, owner.__dict__) if name in d), {}),
                             owner, name)
                            for owner, name in (_owner(module, path) for path in self.lifted.param_tensors.paths)]
        return [t if (t := d.get(name)) is not None else getattr(owner, name) for d, owner, name in self._owners]

    def weights(self, tensors) -> MoEWeights:
        """The layer's weights from its current parameters (see the module docstring); the views of the
        last call while the same tensors hold the same memory (writes into it need no rebuild)."""
        kept = self._kept_for(_identities(tensors))
        if kept is not None:
            return kept.weights
        stacks = {idx: self._stack(idx, [tensors[i] for i in idx]) for idx in self.lifted.weights.stacked}
        w = self.lifted.weights(tensors, stacks)
        # kept only when every stack is a view the parameters write into (a copy, for tied experts,
        # goes stale at the next in-place update); identities taken after stacking moved them
        shared = all(self._stacks[idx][1] is not None for idx in stacks)
        self._kept = _Kept(_identities(tensors), w) if shared else None
        return w

    def _kept_for(self, identities: tuple) -> Optional["_Kept"]:
        """The weights kept from the last call when ``identities`` (`_identities` of the tensors now) are
        theirs, else None."""
        return self._kept if self._kept is not None and self._kept.identities == identities else None

    def _why_not(self, x, tensors, kept: Optional["_Kept"]) -> Optional[str]:
        """`why_not_kernels` of this call, remembered per input dtype and device in ``kept`` (the weights
        kept for these very tensors: their dtypes and devices cannot have changed)."""
        key = (type(x), x.dtype, x.device) if isinstance(x, torch.Tensor) else None
        if kept is not None and key in kept.support:
            return kept.support[key]
        reason = why_not_kernels(x, tensors, fp32_ok=True)
        if kept is not None and key is not None:
            kept.support[key] = reason
        return reason

    def _bound(self, c, w: MoEWeights, x2, logits=None, choices=None):
        """``(program, per-call inputs)``: ``c``'s program with ``w``'s tensors bound
        (`moec.runtime.program.Program.bind`) while `weights` keeps ``w`` (the same tensors, addresses,
        shapes and strides), else the program and every input. A tensor moec converts at each call (a
        selection bias in another dtype than fp32: read in fp32) stays unbound, so writes into the user's
        tensor are seen."""
        kept = self._kept
        if kept is None or kept.weights is not w:
            return c.program, moe_inputs(x2, w, logits, choices), None
        got = kept.programs.get(id(c))
        if got is None or got[0] is not c:
            inputs = moe_inputs(x2, w)
            # inputs moec converts (a selection bias or expert norms in another dtype than fp32): per call
            fresh = tuple(k for k, v in inputs.items() if k in _CONVERTED and v is not getattr(w, k))
            got = kept.programs[id(c)] = (c, c.program.bind({k: v for k, v in inputs.items() if k not in fresh}),
                                          fresh, GraphCache())
        _, bound, fresh, graphs = got
        per_call = {"x": x2, **({"logits": logits} if logits is not None else {}),
                    **({"choices": choices} if choices is not None else {})}
        return bound, {**per_call, **{k: getattr(w, k).float() for k in fresh}}, graphs

    def _graphed(self, c, bound, inputs: dict, graphs: GraphCache, group_size=None):
        """The call through a CUDA graph of ``bound`` for this token count (`moec.runtime.graphs`); None
        when this call cannot take one (the reason is counted for explain())."""
        why = (not_capturable(inputs["x"])
               or (inputs["x"].shape[0] > graphs.MAX_TOKENS and f"more than {graphs.MAX_TOKENS} tokens (prefill: "
                                                                 f"its launches cost little next to its kernels)")
               or (not c.program.graph_safe and f"the program is not graph-safe: "
                                                f"{', '.join(c.program.graph_unsafe_steps())}")
               or (launch.is_recording() and "launches are being recorded")
               or (self.dump_dir is not None and id(c) not in self._launches_dumped
                   and "its first call writes the dump's launches") or graphs.failed)
        if why:
            self.graph_skips[why] += 1
            return None
        try:
            return graphs.run(functools.partial(bound.run, group_size=group_size), inputs,
                              graph_key(inputs) + (group_size,))
        except Exception as e:  # noqa: BLE001 - a capture that fails must not fail the call: no graphs
            graphs.failed = f"capture failed: {type(e).__name__}: {e}"
            self.graph_skips[graphs.failed] += 1
            return None

    def _stack(self, idx: tuple, members: list) -> torch.Tensor:
        got = self._stacks.get(idx)
        # reused while every member is still exactly its slot of the stack: same address, and the slot's
        # shape, strides and dtype (``p.data = p.data.t()`` keeps the address but not the layout)
        if got is not None and got[1] == tuple(m.data_ptr() for m in members) \
                and all(m.dtype == got[0].dtype and m.device == got[0].device and m.shape == got[0].shape[1:]
                        and m.stride() == got[0].stride()[1:] for m in members):
            return got[0]
        stack, addresses = share_storage(members)
        self._stacks[idx] = (stack, addresses)
        return stack

    def captured(self) -> str:
        """What the frontend read off the module: formulation, spec, weight bindings, notes."""
        lines = [f"region {self.name}: {self.lifted.formulation}", f"spec: {self.spec}",
                 f"outputs: {self.lifted.outputs}"]
        paths = getattr(self.lifted.param_tensors, "paths", None)
        describe = getattr(self.lifted.weights, "describe", None)
        if paths is not None and describe is not None:
            lines += ["weights:"] + [f"  {line}" for line in describe(paths)]
        lines += [f"note: {n}" for n in self.lifted.notes]
        return "\n".join(lines) + "\n"

    # ---- calls ------------------------------------------------------------------------------
    def guard(self, module) -> Optional[str]:
        """Check what the lift relied on; lift again after a change. None, or why this call runs eager."""
        if self._guard is None or self._guard.root is not module or not self._guard.holds():
            state = guards.read(module)
            if state != self.state:
                self._switch(module, state)
            self._guard = guards.Guard(module)
            self._owners = self._observed = None
        if self.lifted is None:
            return self.unlifted
        if module.training in self.lifted.eager_in:
            return (f"{'training' if module.training else 'eval'} mode, which the probe could not confirm: "
                    f"{self.lifted.eager_in[module.training]}")
        hooked, mixed = self._guard.call_checks()
        # (the external router and shared expert are called as the forward calls them: their hooks run)
        hooked = [p for p in hooked if p not in self.lifted.observed and not _inside(p, self.lifted.router_module)
                  and not _inside(p, self.lifted.shared_module)]
        if hooked:
            where = "global forward hooks" if hooked == ["*"] else f"forward hooks on {', '.join(hooked[:3])}"
            return f"{where} (they run only in the eager forward)"
        if mixed:
            return "submodules in another training mode than the layer"
        return None

    def _switch(self, module, state: tuple) -> None:
        if not self._lifts:                       # the compile-time lift, for the state it was made in
            self._lifts[self.state] = self.lifted
        change = guards.changes(self.state, state)
        got = self._lifts.get(state)
        if got is None and state not in self._lifts:
            self._lifting = True
            try:
                got = lift(module)                # the probe's calls of the module run its eager forward
            except Exception as e:  # noqa: BLE001 - the frontend must not break a model eager PyTorch runs
                got = f"analysis failed: {type(e).__name__}: {e}"
            finally:
                self._lifting = False
            got = got if (got is None or isinstance(got, str) or hasattr(got, "spec")) else got.reason
            self._lifts[state] = got
            while len(self._lifts) > self.MAX_LIFTS:
                self._lifts.popitem(last=False)
        self._lifts.move_to_end(state)
        self.state = state
        if got is None or isinstance(got, str):
            self.lifted, self.unlifted = None, f"changed since compile ({change}) and not liftable: {got or 'no MoE layer found'}"
            self.guard_changes[f"{change} -> eager"] += 1
        else:
            self.lifted, self._stacks, self._kept = got, {}, None
            self.guard_changes[f"{change} -> lifted again ({got.spec.describe()})"] += 1

    def __call__(self, module, eager_forward, x, *args, **kwargs):
        if self._lifting:
            return eager_forward(x, *args, **kwargs)
        if is_disabled():
            return self.eager("moec.disabled() is active", eager_forward, x, *args, **kwargs)
        reason = self.guard(module)
        if reason is not None:
            return self.eager(reason, eager_forward, x, *args, **kwargs)
        tensors = self.tensors(module)
        kept = self._kept_for(_identities(tensors))
        choices, reason = self._choices(module, x, args, kwargs)
        reason = reason or self._why_not(x, tensors, kept)
        if reason is None and x.shape[-1] != self.spec.hidden:
            raise ValueError(f"moec region {self.name!r}: expects hidden size {self.spec.hidden} on the "
                             f"last dim, got input of shape {tuple(x.shape)}")
        reason = reason or empty_with_grad(x.numel())
        if reason is None and self.spec.router.renormalize_kept and x.dtype != torch.float32:
            reason = (f"weights normalised over the kept pairs in {str(x.dtype).replace('torch.', '')}: eager code "
                      f"clamps their sum at its dtype's eps, moec at fp32's")
        if reason is None and self.spec.router.capacity_per == "sequence" and x.dim() != 3:
            reason = (f"the per-sequence expert capacity was confirmed on [batch, sequence, hidden] inputs; this one "
                      f"has {x.dim()} dims")
        if reason is not None:
            return self.eager(reason, eager_forward, x, *args, **kwargs)
        x2 = x.reshape(-1, x.shape[-1])
        if self._observed is None:
            self._observed = [(path, module.get_submodule(path)) for path in self.lifted.observed]
        replay = call_observed(module, self.lifted, self._observed, x, x2) if self._observed else None
        if replay == "cannot":
            return self.eager("hooks on the router, which the forward calls in a way moec cannot repeat",
                              eager_forward, x, *args, **kwargs)
        if replay is not None:                    # a router hook changed the router's output
            with replay:
                return self.eager("a router hook changed the router's output", eager_forward, x, *args, **kwargs)
        noise = None
        training = module.training
        if self.spec.router.noisy and training:
            dtype = self.lifted.noise_dtype or x.dtype
            if dtype == self.lift_dtype:        # eager draws in the layer's dtype, which follows .to()
                dtype = x.dtype
            noise = torch.randn(x2.shape[0], self.spec.num_experts, dtype=dtype, device=x.device)
        w = kept.weights if kept is not None else self.weights(tensors)
        group = x.shape[-2] if self.spec.router.capacity_per == "sequence" else None
        # an external router runs as the forward runs it: by PyTorch, with its hooks, under autograd
        logits = self._external(module, self.lifted.router_module, x, x2).reshape(x2.shape[0], -1).float() \
            if self.spec.external_router else None
        given = [logits] if logits is not None else []
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors + given)):
            lifted = self.lifted          # the backward differentiates this call's lift, whatever comes after it
            outs = self.serve("kernels forward and backward", KernelsBoth.apply,
                              lambda ts: self.kernels(ts[0], w, training, noise, saving=True, group_size=group,
                                                      logits=ts[-1] if given else None, choices=choices),
                              lambda ts, saved, grads, needs: kernels_backward(self, lifted, ts, saved, grads, needs,
                                                                                    w, training, noise),
                              None, x2, *tensors, *given)
        else:
            outs = self.serve("kernels", self.kernels, x2, w, training, noise, False, group, logits, choices)
        return self.pack(outs, x, w, module, group, logits)

    def pack(self, outs, x, w: MoEWeights, module=None, group_size=None, logits=None):
        """The forward's result from the program's outputs ``outs``: its items in its kinds, dtypes and
        container (`moec.frontend.outputs`); a norm of the layer's output (`LiftedMoE.post`) is applied to y
        as the forward applies it, by calling that child of ``module``. ``logits``: an external router's."""
        got = dict(zip(self.outputs, outs))
        if logits is not None:
            got["logits"] = logits
        got["y"] = got["y"].reshape((-1, x.shape[-1]) if self.lifted.y_flat else x.shape)
        if self.lifted.shared_module is not None:        # an external shared expert, added as the forward adds it
            got["y"] = got["y"] + self._external(module, self.lifted.shared_module, x,
                                                 x.reshape(-1, x.shape[-1])).reshape(got["y"].shape)
        if self.lifted.post is not None:
            got["y"] = module.get_submodule(self.lifted.post)(got["y"])
        kinds = slots(self.lifted.outputs)
        rules = self.lifted.out_dtypes or ("x",) * len(kinds)
        items = []
        for i, (kind, rule) in enumerate(zip(kinds, rules)):
            v = got[kind] if kind in got else derive(kind, got["logits"], self.spec.router, w.score_bias, group_size)
            dtype = item_dtype(rule, x.dtype)
            v = v.to(dtype) if v is not None and dtype is not None and v.dtype != dtype else v
            if i < len(self.lifted.out_leads) and self.lifted.out_leads[i] and v is not None:
                v = v.reshape(item_shape(tuple(v.shape), True, x.shape))
            items.append(v)
        return pack(items, self.lifted.container)

    def _choices(self, module, x, args, kwargs) -> tuple:
        """``(choices, None)`` for a layer that routes by token id (the table's rows of the call's token ids,
        `moec.frontend.token_table.CallChoices`), ``(None, None)`` for another called as ``forward(x)``, else
        ``(None, why this call runs eager)``."""
        ids, ignored = self.lifted.token_ids, self.lifted.ignored_args
        if not args and not kwargs and ids is None:
            return None, None
        if ids is None and not ignored:
            return None, "extra forward arguments"
        got = self._call_choices
        if got is None or got.ids is not ids or got.ignored != ignored:
            got = self._call_choices = CallChoices(ids, self.spec.num_experts, ignored)
        return got(own_forward(module), module, x, args, kwargs)

    def _external(self, module, path: str, x, x2):
        """The child at ``path`` (an external router or shared expert) called with the arguments the forward
        passes it (`LiftedMoE.external_calls`: the input as given or its rows ``x2``, tensors of the layer)."""
        args, kwargs = arguments(module, self.lifted.external_calls[path], x, x2)
        return module.get_submodule(path)(*args, **kwargs)

    def kernels(self, x2, w: MoEWeights, training, noise, saving: bool = False, group_size=None, logits=None,
                choices=None):
        """The program's outputs; with ``saving`` also what the backward reads (``{role: tensor}``,
        `moec.ir.backward.SAVED`: the routing, the dispatch, and the gate/up products when the training
        forward's save-activations pass chose to keep them). ``logits``: an external router's; ``choices``: a
        token table's rows for the call's tokens."""
        last = self._program
        if last is not None and last[0] is self.lifted and last[1] == saving and last[2] == x2.dtype \
                and last[3] == x2.device and last[4].generation == tune_file.generation():
            c = last[4]
        else:
            recipe = replace(self.recipe, saving=self.saving) if saving else self.recipe
            c = self.compiled_for(recipe, x2.dtype, x2.device)
            self._program = (self.lifted, saving, x2.dtype, x2.device, c)
        x2 = x2.contiguous() if x2.stride(-1) != 1 else x2
        if not saving:
            program, inputs, graphs = self._bound(c, w, x2, logits, choices)
            if self.mode == "reduce-overhead" and graphs is not None and noise is None:
                got = self._graphed(c, program, inputs, graphs, group_size)
                if got is not None:
                    return got
            return self.run(c, inputs, training=training, noise=noise, program=program, group_size=group_size)
        inputs = moe_inputs(x2, w, logits, choices)
        env = self.run(c, inputs, training=training, noise=noise, values=True, group_size=group_size)
        return [env[o] for o in c.graph.outputs], read_saved(c.graph, env)

    # ---- report -----------------------------------------------------------------------------
    def report(self, qualname: str, cls: str) -> list[str]:
        changed = [f"        changed after compile, {n} x: {what}" for what, n in self.guard_changes.items()]
        if self.lifted is None:
            return [f"EAGER   {qualname or '<root>'} ({cls}): {self.unlifted}"] + changed + \
                [f"        {line}" for line in self.call_lines()]
        lines = [f"LIFTED  {qualname or '<root>'} ({cls}): {self.lifted.formulation}",
                 f"        {self.spec.describe()}"]
        lines += changed
        lines += [f"        {note}" for note in getattr(self.lifted, "notes", []) if note.startswith(_SHOWN_NOTES)]
        lines += [f"        {line}" for line in self.program_lines()]
        lines += [f"        {line}" for line in self.graph_lines()]
        lines += [f"        {line}" for line in self.backward_lines()]
        return lines + [f"        {line}" for line in self.call_lines()]

    def graph_lines(self) -> list[str]:
        """mode="reduce-overhead": the token counts captured as CUDA graphs, their replays, and why calls
        took none."""
        if self.mode != "reduce-overhead":
            return []
        caches = [g for kept in [self._kept] if kept is not None for (_, _, _, g) in kept.programs.values()]
        lines = [f"CUDA graphs (mode='reduce-overhead'): {sum(g.captures for g in caches)} captured, "
                 f"{sum(g.replays for g in caches)} replays"]
        return lines + [f"  no graph, {n} x: {why}" for why, n in sorted(self.graph_skips.items())]

    def backward_lines(self) -> list[str]:
        """What the backward runs and what each training forward kept for it (save-activations)."""
        trained = [c for (r, _, _), c in self.compiled.items() if getattr(r, "saving", "")]
        kept = [f"training forward for {str(c.dtype).replace('torch.', '')} on {c.arch.name}: "
                f"{choice_for(c.graph, c.arch, c.recipe.saving).text()}" for c in trained]
        return ["backward: generated kernels; the router's backward in torch"] + (kept or [
            f"training forward: not run yet (activations={self.saving!r} decides what it keeps for the backward)"])


_SHOWN_NOTES = ("traced router path", "experts:", "shared expert", "probe:", "training mode runs eager",
                "eval mode runs eager", "output norm", "routing by token id")   # the rest: captured.txt


@dataclass(eq=False)
class _Kept:
    """The weights a region built from its tensors, kept while the tensors are the same objects with the
    same addresses, shapes, strides and dtypes (`_identities`), with what was worked out for them."""

    identities: tuple
    weights: MoEWeights
    programs: dict = field(default_factory=dict)      # id(compiled) -> (compiled, bound, fresh inputs, graphs)
    support: dict = field(default_factory=dict)       # (input type, dtype, device) -> why_not_kernels


_CONVERTED = ("score_bias", "w_expert_norm")       # `MoEWeights` fields moe_inputs reads in fp32


def _inside(path: str, root: Optional[str]) -> bool:
    """Whether module ``path`` is ``root`` or inside it (None: no root)."""
    return root is not None and (path == root or path.startswith(root + "."))


def _owner(module, path: str) -> tuple:
    owner, _, name = path.rpartition(".")
    return (module.get_submodule(owner) if owner else module), name


def share_storage(members: list) -> tuple[torch.Tensor, Optional[tuple]]:
    """``(stack of members, their addresses)``: the members become views of the stack (``.data``, so
    each keeps its identity, gradients and optimizer state), unless they cannot share one storage
    (tied, or of different dtypes, devices or shapes): then a fresh copy, and no addresses (so the
    caller stacks again at its next call, always reading the current values)."""
    first = members[0]
    if len({m.data_ptr() for m in members}) < len(members) or any(
            m.dtype != first.dtype or m.device != first.device or m.shape != first.shape for m in members):
        return torch.stack([m.detach() for m in members]), None
    with torch.no_grad():
        stack = torch.stack([m.detach() for m in members])
        for j, m in enumerate(members):
            m.data = stack[j]
    return stack, tuple(m.data_ptr() for m in members)


def _identities(tensors) -> tuple:
    return tuple((id(t), t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors)
