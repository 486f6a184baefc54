"""A compiled layer and its eager twin, driven through random sequences of what users do to models.

`hypothesis`'s `RuleBasedStateMachine` draws sequences of: compile, call at a random token count
(with or without gradients), change the weights (``.data`` writes, ``copy_`` under ``no_grad``, an
optimizer step, ``load_state_dict``, a replaced parameter, a dtype change, ``p.data = p.data.t()``),
change floating buffers (in place or replaced), change an attribute
the lift read, add or remove hooks (on the layer, its router, an expert), switch training and eval
mode, save and load, deep-copy, wrap in `torch.compile`. The eager twin gets the same changes
(save/load, copy and torch.compile apply to the compiled side only: they must not change answers).
After every step the two agree on a call; a call the kernels did not serve must have a reason.

Layers: zoo Mixtral (ModuleList experts), zoo stacked-experts module, zoo Qwen (shared expert, router
logits output), zoo DeepSeek-V3 (selection bias buffer, groups, shared expert), zoo noisy top-k (noise in training), zoo ST-MoE (a namedtuple of y, aux loss, z-loss
and counts), zoo Mixtral with biased experts, and the MoE blocks of transformers' Mixtral (router
jitter) and Qwen3-MoE. The ``ci`` profile runs a few short sequences per layer; the
``large`` profile (``HYPOTHESIS_PROFILE=large``) runs many long ones.
"""
from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, \
    run_state_machine_as_test
from torch import nn

import moec
import zoo

D = 16
SEEN: list = []          # what observing hooks saw (module level: hooks must pickle with the model)


def _scale_output(factor, module, args, out):
    return tuple(o * factor if torch.is_tensor(o) and o.is_floating_point() else o for o in out) \
        if isinstance(out, tuple) else out * factor


def _observe(module, args, out):
    SEEN.append(type(out))


def _halve_input(module, args):
    return (args[0] * 0.5,) + tuple(args[1:])


def _hf_block(family: str):
    import transformers
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = transformers.MixtralConfig(hidden_size=D, intermediate_size=24, num_local_experts=4,
                                         num_experts_per_tok=2, router_jitter_noise=0.0)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = transformers.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=24, num_experts=6,
                                          num_experts_per_tok=2, norm_topk_prob=True)
    block = Block(cfg)
    with torch.no_grad():                 # standalone blocks are not initialised by a model
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


# name -> (factory, router path, an expert path, attributes: [(module path, name, values)])
LAYERS = {
    "zoo-mixtral": (zoo.MixtralMoE, "gate", "experts.1",
                    [("", "top_k", (1, 2, 3)), ("", "norm_topk_prob", (True, False))]),
    "zoo-stacked-module": (zoo.StackedExpertsModuleMoE, "gate", "experts", [("gate", "top_k", (1, 2))]),
    "zoo-qwen": (zoo.QwenMoE, "gate", "experts.0", [("", "top_k", (1, 2)), ("", "norm_topk_prob", (False, True))]),
    "zoo-noisy": (zoo.NoisyTopKMoE, "w_gate", "experts.2", [("", "k", (1, 2))]),
    "zoo-st-moe": (zoo.STMoE, "gate", "experts.3", [("", "top_k", (2, 1, 3))]),
    "zoo-deepseek": (zoo.DeepseekV3MoE, "gate", "experts.1",
                     [("gate", "top_k", (3, 2)), ("gate", "topk_group", (2, 4))]),
    "zoo-biased": (zoo.BiasedExpertMoE, "gate", "experts.0", [("", "top_k", (2, 1)), ("", "norm_topk_prob", (True, False))]),
    "hf-mixtral": (functools.partial(_hf_block, "mixtral"), "gate", "experts",
                   [("", "top_k", (2, 1)), ("", "jitter_noise", (0.0, 0.1))]),
    "hf-qwen3-moe": (functools.partial(_hf_block, "qwen3"), "gate", "experts",
                     [("gate", "top_k", (2, 3)), ("gate", "norm_topk_prob", (True, False))]),
}


def _close(a, b, dtype):
    # float32's tolerance in float64 too: optimizer steps taken in float32 leave the twins' weights
    # apart by rounding (gradients of kernels and of eager code round differently)
    tol = dict(rtol=1e-4, atol=1e-5)
    if a is None or b is None:
        assert a is None and b is None
        return
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, dtype)
        return
    torch.testing.assert_close(a, b, **tol)


def _regions(model):
    return [m.__dict__["_moec_region"] for m in model.modules() if "_moec_region" in m.__dict__]


class Twins(RuleBasedStateMachine):
    """``self.model`` (compiled once `compile` ran) and ``self.twin`` (eager), changed alike."""

    layer = "zoo-mixtral"

    @initialize(seed=st.integers(0, 3), training=st.booleans(), compiled=st.sampled_from([True, True, False]))
    def build(self, seed, training, compiled):
        factory, self.router, self.expert, self.attrs = LAYERS[self.layer]
        torch.manual_seed(seed)
        self.model = factory().train(training)
        self.twin = copy.deepcopy(self.model)
        self.call_model = self.model
        self.compiled = False
        self.dtype = torch.float32
        self.hooks: list = []
        self.step = 0
        if compiled:
            self.compile()

    # ---- both sides alike --------------------------------------------------------------------
    def _both(self, fn):
        fn(self.model)
        fn(self.twin)

    @precondition(lambda self: not self.compiled)
    @rule()
    def compile(self):
        moec.compile(self.model)
        self.compiled = True
        self.call_model = self.model

    @rule(T=st.sampled_from([1, 3, 17, 40]), grad=st.booleans())
    def call(self, T, grad):
        self._check(T, grad)

    @rule(way=st.sampled_from(["data", "copy", "sgd", "load_state_dict", "replace", "dtype", "transpose"]),
          seed=st.integers(0, 1000))
    def change_weights(self, way, seed):
        g = torch.Generator().manual_seed(seed)
        names = [n for n, _ in self.twin.named_parameters()]
        name = names[seed % len(names)]
        new = torch.randn(self.twin.get_parameter(name).shape, generator=g, dtype=torch.float64) * 0.3

        def apply(net):
            p = net.get_parameter(name)
            if way == "data":
                p.data.mul_(1.25)
            elif way == "copy":
                with torch.no_grad():
                    p.copy_(new)
            elif way == "sgd":             # (Adam would amplify rounding-level gradient differences)
                opt = torch.optim.SGD(net.parameters(), lr=0.1)
                torch.manual_seed(seed)
                out = net(torch.randn(1, 5, D, dtype=self.dtype))
                (out[0] if isinstance(out, tuple) else out).square().mean().backward()
                opt.step()
                net.zero_grad(set_to_none=True)
            elif way == "load_state_dict":
                net.load_state_dict({k: v * 0.9 for k, v in self.twin.state_dict().items()})
            elif way == "replace":
                owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
                setattr(net.get_submodule(owner), leaf, nn.Parameter(new.to(self.dtype).clone()))
            elif way == "transpose" and p.dim() == 2 and p.shape[0] == p.shape[1]:
                p.data = p.data.t()        # the same address, other strides
        if way == "load_state_dict":       # both load the twin's state (read before either changes)
            state = {k: v * 0.9 for k, v in self.twin.state_dict().items()}
            for net in (self.model, self.twin):
                net.load_state_dict(state)
        elif way == "dtype":               # a round trip: float64 (eager: no float64 kernels), one call, back
            self.dtype = torch.float64
            self._both(lambda net: net.to(self.dtype))
            self._check(5, False)
            self.dtype = torch.float32
            self._both(lambda net: net.to(self.dtype))
        else:
            self._both(apply)

    @rule(way=st.sampled_from(["add", "replace"]), seed=st.integers(0, 1000))
    def change_buffers(self, way, seed):
        """Floating buffers (a selection bias) written in place (load balancing) or replaced."""
        for name, b in self.twin.named_buffers():
            if not b.is_floating_point():
                continue
            new = torch.randn(b.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            for net in (self.model, self.twin):
                owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
                mod = net.get_submodule(owner)
                if way == "add":
                    getattr(mod, leaf).add_(new.to(b.dtype))
                else:
                    mod.register_buffer(leaf, new.to(b.dtype))

    @rule(data=st.data())
    def change_attribute(self, data):
        path, name, values = data.draw(st.sampled_from(self.attrs))
        value = data.draw(st.sampled_from(values))
        self._both(lambda net: setattr(net.get_submodule(path), name, value))

    @rule(where=st.sampled_from(["layer", "router", "expert"]), kind=st.sampled_from(["scale", "observe", "pre"]))
    def add_hook(self, where, kind):
        path = {"layer": "", "router": self.router, "expert": self.expert}[where]
        for net in (self.model, self.twin):
            m = net.get_submodule(path)
            if kind == "pre":
                self.hooks.append(m.register_forward_pre_hook(_halve_input))
            else:
                self.hooks.append(m.register_forward_hook(
                    functools.partial(_scale_output, 1.5) if kind == "scale" else _observe))

    @rule()
    def remove_hooks(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    @rule(training=st.booleans())
    def mode(self, training):
        self._both(lambda net: net.train(training))

    # ---- the compiled side only --------------------------------------------------------------
    @precondition(lambda self: self.compiled)
    @rule(how=st.sampled_from(["torch.save", "deepcopy"]))
    def save_load(self, how):
        self.remove_hooks()                # handles refer to the old object's hook tables
        if how == "torch.save":
            buf = io.BytesIO()
            torch.save(self.model, buf)
            buf.seek(0)
            self.model = torch.load(buf, weights_only=False)
        else:
            self.model = copy.deepcopy(self.model)
        self.call_model = self.model

    @precondition(lambda self: self.compiled)
    @rule()
    def wrap_in_torch_compile(self):
        self.call_model = torch.compile(self.model, dynamic=False, backend="aot_eager")

    # ---- the check ---------------------------------------------------------------------------
    @invariant()
    def agree(self):
        self._check(3, False)

    def _check(self, T, grad):
        self.step += 1
        x = torch.randn(1, T, D, dtype=self.dtype, generator=torch.Generator().manual_seed(self.step))
        outs = []
        for net in (self.twin, self.call_model):
            xi = x.clone().requires_grad_(grad)
            torch.manual_seed(self.step)          # noisy gating / jitter draw the same numbers
            try:
                with torch.set_grad_enabled(grad):
                    out = net(xi * 1.0)           # hidden states come out of a previous layer
            except Exception as e:                # what eager raises, the compiled model must raise
                if net is self.twin:
                    with pytest.raises(Exception):
                        torch.manual_seed(self.step)
                        self.call_model(x.clone().requires_grad_(grad) * 1.0)
                    return
                raise AssertionError(f"the compiled model raised where eager did not: {e!r}") from e
            grads = None
            if grad:
                y = out[0] if isinstance(out, tuple) else out
                y.square().sum().backward()
                grads = [xi.grad] + [p.grad for p in net.parameters()]
                net.zero_grad(set_to_none=True)
            outs.append((out, grads))
        (b, gb), (a, ga) = outs
        _close(a, b, self.dtype)
        if grad:
            # gradients that cancel exactly (a top-1 renormalised router's: w / w) are rounding noise on
            # both sides, of the size of the terms that cancel: the tolerance scales with the largest
            # gradient of the call
            scale = max(1.0, max(float(g.abs().max()) for g in gb if g is not None and g.numel()))
            for u, v in zip(ga, gb):
                assert (u is None) == (v is None)
                if u is not None:
                    torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5 * scale)
        for region in _regions(self.model):
            for what in region.calls:
                assert what.startswith(("kernels", "backward: kernels")) or what.startswith("eager: ") and len(what) > 10, what


def _settings() -> settings:
    large = settings.default.max_examples >= 100
    return settings(settings.default, max_examples=60 if large else 3, stateful_step_count=30 if large else 8)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_compiled_and_eager_twins_agree(layer):
    machine = type(f"Twins_{layer.replace('-', '_')}", (Twins,), {"layer": layer})
    run_state_machine_as_test(machine, settings=_settings())
