"""The experts module of a transformers MoE block that stays eager runs on moec's kernels
(`moec.hf.block_experts`): the block's routing as written (an MLP router, sparsemixer, a router scoring shared
experts, a decoder-layer MoE), the expert computation as generated kernels; every answer equal to eager's, in every
state a user can reach."""
import copy
import os
import pickle

import pytest
import torch

pytest.importorskip("transformers")

import hf_sweep  # noqa: E402

import moec  # noqa: E402
from moec.hf.block_experts import BlockExperts  # noqa: E402

TOL = dict(rtol=2e-4, atol=2e-4)


def _pair(name: str, **config):
    if name not in hf_sweep.families():
        pytest.skip(f"no {name} in this transformers")
    eager = hf_sweep.build(name, **config)
    return moec.compile(copy.deepcopy(eager)), eager


def _served(model) -> dict:
    return {q: m.__dict__["_moec_region"] for q, m in model.named_modules()
            if isinstance(m.__dict__.get("_moec_region"), BlockExperts)}


def _ids(seed: int = 1, shape=(2, 7)):
    return torch.randint(3, hf_sweep.VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# an MLP router (Zaya), sparsemixer (PhiMoE), a decoder layer holding the MoE beside attention (Gemma4), a router
# that also scores the shared experts (Inkling: checked under the large profile)
FAMILIES = ["zaya", "phimoe", "gemma4_text"] + (["inkling_text"] if os.environ.get("HYPOTHESIS_PROFILE") == "large"
                                                 else [])


@pytest.mark.parametrize("name", FAMILIES)
def test_an_eager_blocks_experts_run_the_kernels(name):
    model, eager = _pair(name)
    served = _served(model)
    assert served, model.explain()
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)
    for q, region in served.items():
        assert region.calls == {"kernels": 1}, (q, region.calls)
    lines = model.explain().splitlines()      # each under its block's entry (layers alike: one entry)
    heads = [i for i, ln in enumerate(lines) if ln.strip().startswith("EXPERTS ")]
    assert heads, lines
    for at in heads:
        assert lines[at - 1].strip().startswith("EAGER "), lines[at - 1]
        assert "the routing stays" in lines[at] and "calls: 1 x kernels" in lines[at + 1], lines[at:at + 2]


def test_training_gradients_equal_eagers():
    """In training the experts' backward runs generated kernels; the router's gradients flow through the
    routing weights the block computed (its MLP router's parameters get theirs from autograd)."""
    model, eager = _pair("zaya")
    ids = _ids(2)
    for m in (model, eager):
        m.train()
        torch.manual_seed(0)
        m(input_ids=ids).logits.float().pow(2).mean().backward()
    got, want = dict(model.named_parameters()), dict(eager.named_parameters())
    for name, p in want.items():
        if p.grad is None:
            assert got[name].grad is None, name
            continue
        torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    (region,) = _served(model).values()
    assert region.calls["kernels forward and backward"] == 1 and region.calls["backward: kernels"] == 1
    assert any(torch.count_nonzero(got[n].grad) for n in got if "router_mlp" in n)


def test_weights_updated_in_place_are_read_afresh():
    model, eager = _pair("zaya")
    with torch.no_grad():
        for m in (model, eager):
            m.model.layers[0].mlp.experts.down_proj.mul_(-2.0)
    ids = _ids(3)
    torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)


def test_pickled_and_deep_copied_models_are_served_again():
    model, eager = _pair("zaya")
    ids = _ids(4)
    for again in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert _served(again), again.explain()
        torch.testing.assert_close(_logits(again, ids), _logits(eager, ids), **TOL)
        assert all(r.calls == {"kernels": 1} for r in _served(again).values())


def test_hooks_on_the_experts_module_see_its_output_and_may_change_it():
    model, eager = _pair("zaya")
    seen = {}

    def hook(tag):
        def fn(module, args, out):
            seen[tag] = out.clone()
            return out * 0.5
        return fn

    for tag, m in (("moec", model), ("eager", eager)):
        m.model.layers[0].mlp.experts.register_forward_hook(hook(tag))
    ids = _ids(5)
    torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)
    torch.testing.assert_close(seen["moec"], seen["eager"], **TOL)
    assert next(iter(_served(model).values())).calls == {"kernels": 1}


def test_a_keyword_call_is_served_and_what_the_kernels_do_not_take_runs_the_models_own_choice():
    model, eager = _pair("zaya")
    experts, ref = model.model.layers[0].mlp.experts, eager.model.layers[0].mlp.experts
    x = torch.randn(5, experts.gate_up_proj.shape[-1])
    ids = torch.tensor([[0, 1], [2, 3], [1, 1], [7, 0], [4, 5]])
    w = torch.rand(5, 2)
    with torch.no_grad():
        torch.testing.assert_close(experts(hidden_states=x, top_k_index=ids, top_k_weights=w), ref(x, ids, w), **TOL)
        xb, wb = x.bfloat16(), w.bfloat16()        # bf16 on a CPU: not on the (interpreted) kernels
        torch.testing.assert_close(experts.bfloat16()(xb, ids, wb), ref.bfloat16()(xb, ids, wb))
    region = _served(model)["model.layers.0.mlp.experts"]
    assert region.calls["kernels"] == 1 and sum(n for k, n in region.calls.items() if k.startswith("eager")) == 1
    with moec.disabled(), torch.no_grad():
        experts.float()(x, ids, w)
    assert region.calls["eager: moec.disabled() is active"] == 1


def test_a_forward_that_wraps_the_interface_is_not_served():
    """Ergo's experts module subclasses the interface's projections and normalises each expert's output in its
    own forward: serving the projections' interface would skip that norm, so the module stays as written."""
    model, eager = _pair("ergo")
    assert not _served(model)
    ids = _ids(6)
    torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)


def test_under_torch_compile():
    """dynamo traces the experts module's own forward (transformers' implementation): eager's answers."""
    model, eager = _pair("zaya")
    ids = _ids(7)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    torch.testing.assert_close(_logits(compiled, ids), _logits(eager, ids), **TOL)
    assert "EXPERTS" in model.explain()


def test_a_model_already_on_moecs_experts_implementation_falls_back_without_recursion():
    """With ``experts_implementation="moec"`` chosen by the user, a call the kernels do not take (moec.disabled(),
    bf16 on a CPU) runs the module's eager forward, not moec's implementation again."""
    import moec.hf
    moec.hf.register()
    if "zaya" not in hf_sweep.families():
        pytest.skip("no zaya in this transformers")
    eager = hf_sweep.build("zaya", experts_implementation="moec")
    model = moec.compile(copy.deepcopy(eager))
    ids = _ids(8)
    with moec.disabled():
        torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)
    low, low_ref = copy.deepcopy(model).bfloat16(), copy.deepcopy(eager).bfloat16()
    torch.testing.assert_close(_logits(low, ids), _logits(low_ref, ids))


def test_fullgraph_torch_compile_traces_the_experts_own_forward():
    model, eager = _pair("zaya")
    ids = _ids(9)
    got = _logits(torch.compile(model, backend="eager", fullgraph=True), ids)
    torch.testing.assert_close(got, _logits(eager, ids), **TOL)


def test_an_experts_implementation_of_the_users_own_is_honoured():
    """A function the user registered and chose (``set_experts_implementation``) is their maths: it runs, before
    compiling and after, and explain() counts why."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    model, eager = _pair("zaya")
    ALL_EXPERTS_FUNCTIONS.register("moec_test_doubled",
                                   lambda m, h, i, w: 2 * ALL_EXPERTS_FUNCTIONS["batched_mm"](m, h, i, w))
    ids = _ids(10)
    before = eager.get_experts_implementation()
    for m in (model, eager):
        m.set_experts_implementation("moec_test_doubled")
    torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)
    (region,) = _served(model).values()
    assert region.calls["eager: the model's own experts_implementation 'moec_test_doubled'"] == 1
    for m in (model, eager):
        m.set_experts_implementation(before)
    torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)
    assert region.calls["kernels"] == 1


def test_a_gate_set_on_the_instance_is_read():
    """``experts._apply_gate`` replaced on one module (transformers calls ``self._apply_gate``): that gate, not
    the class's."""
    import types
    model, eager = _pair("zaya")

    def clamped(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate.clamp(max=0.05)) * up

    for m in (model, eager):
        ex = m.model.layers[0].mlp.experts
        ex._apply_gate = types.MethodType(clamped, ex)
    ids = _ids(11)
    torch.testing.assert_close(_logits(model, ids), _logits(eager, ids), **TOL)


def test_the_sentinel_expert_id_adds_nothing():
    """transformers marks experts another rank holds with id E: such pairs add nothing and are never read (the
    reference: the same pairs with weight 0; eager's grouped_mm reads past its buffers for them on a CPU)."""
    model, eager = _pair("zaya")
    experts, ref = model.model.layers[0].mlp.experts, eager.model.layers[0].mlp.experts
    E = experts.gate_up_proj.shape[0]
    x = torch.randn(5, experts.gate_up_proj.shape[-1])
    ids = torch.tensor([[0, E], [2, 3], [E, 1], [E - 1, 0], [3, 2]])
    w = torch.rand(5, 2)
    with torch.no_grad():
        want = ref(x, ids.clamp(max=E - 1), w * (ids < E))
        torch.testing.assert_close(experts(x, ids, w), want, **TOL)
    assert _served(model)["model.layers.0.mlp.experts"].calls["kernels"] == 1


def test_compiling_twice_keeps_serving_and_reporting():
    model, eager = _pair("zaya")
    again = moec.compile(model)
    assert _served(again) and "EXPERTS" in again.explain(), again.explain()
    ids = _ids(12)
    torch.testing.assert_close(_logits(again, ids), _logits(eager, ids), **TOL)
