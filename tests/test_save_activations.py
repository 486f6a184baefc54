"""What a training forward keeps for its backward (passes/save_activations.py): the gate/up products saved
by the forward's fused GEMM, or recomputed in the backward. Both give eager's gradients (every zoo formulation
both ways: tests/test_backward.py); saving runs no grouped GEMM again; either keeps less activation memory than
eager autograd; ``explain()`` says which and why.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import moec
import zoo
from moec.compiler import BackwardRecipe, MoERecipe, compile_program
from moec import reference
from moec.ir import interpret
from moec.ir.backward import PRE_SAVED, saved_values
from moec.ir.build import moe_inputs
from moec.passes.save_activations import decide
from moec.runtime.arch import ARCHS
from moec.spec import MoESpec, RouterConfig
from test_backward import SPECS, _weights

GOLDEN = Path(__file__).parent / "golden" / "train"


# ---- the choice ---------------------------------------------------------------------------------

@pytest.mark.parametrize("d, f, k", [(4096, 14336, 2), (2048, 768, 8), (7168, 2048, 8)])
@pytest.mark.parametrize("arch", ["sm80", "sm90", "sm100"])
def test_auto_saves_at_the_sizes_real_models_have(d, f, k, arch):
    """Mixtral, Qwen3-30B-A3B, DeepSeek-V3: recomputing costs far more time than writing and reading the products."""
    c = decide([k], d, [f], True, 2, ARCHS[arch], "auto")
    assert c.save and c.saved_bytes == k * 2 * f * 2 and c.saved_bytes < c.eager_bytes


def test_auto_recomputes_when_the_products_cost_more_to_move_than_to_compute():
    c = decide([2], 16, [64], True, 4, ARCHS["sm90"], "auto")
    assert not c.save and "recomputed" in c.text()


def test_explicit_policies_are_honoured_and_a_bad_one_is_named():
    for policy, want in (("save", True), ("recompute", False)):
        assert decide([2], 16, [64], True, 2, ARCHS["cpu"], policy).save is want
    with pytest.raises(ValueError, match="activations"):
        decide([2], 16, [64], True, 2, ARCHS["cpu"], "sometimes")
    with pytest.raises(ValueError, match="activations='sometimes'"):
        moec.compile(zoo.MixtralMoE(), activations="sometimes")


def test_the_environment_variable_is_read_strictly(monkeypatch):
    monkeypatch.setenv("MOEC_ACTIVATIONS", "keep")
    with pytest.raises(ValueError, match="MOEC_ACTIVATIONS"):
        moec.compile(zoo.MixtralMoE())
    monkeypatch.setenv("MOEC_ACTIVATIONS", "save")
    m = moec.compile(zoo.MixtralMoE().train())
    m(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert "saved by the forward (activations='save'" in m.explain()


# ---- the IR -------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["qwen_aux", "gpt_oss", "switch_capacity"])
def test_training_forward_and_its_backward_golden(case, monkeypatch, tmp_path):
    """The training forward after save-activations (its fused GEMMs also return pre / pre_up) and the backward
    built to read them, pinned; regenerate with ``MOEC_UPDATE_GOLDEN=1``."""
    monkeypatch.setenv("MOEC_TUNE_FILE", str(tmp_path / "none.json"))
    spec, outputs = SPECS[case]
    fwd = compile_program(MoERecipe(spec, outputs, saving="save"), torch.float16, ARCHS["sm90"])
    pre = tuple(r for r in PRE_SAVED if r in saved_values(fwd.graph))
    bwd = compile_program(BackwardRecipe(MoERecipe(spec, outputs), pre), torch.float16, ARCHS["sm90"])
    texts = {"save-activations": dict(fwd.stages)["save-activations"], "backward": bwd.stages[0][1]}
    for stage, text in texts.items():
        path = GOLDEN / f"{case}.{stage}.ir"
        if os.environ.get("MOEC_UPDATE_GOLDEN"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert text == path.read_text(), f"{path.name} differs from the golden"


@pytest.mark.parametrize("case", list(SPECS))
def test_stored_pre_activations_equal_the_interpreters(case):
    """The fused GEMM's STORE_PRE epilogue writes what the reference interpreter computes for pre / pre_up."""
    spec, outputs = SPECS[case]
    g = torch.Generator().manual_seed(3)
    w, x = _weights(spec, g), torch.randn(9, spec.hidden, generator=g)
    fwd = compile_program(MoERecipe(spec, outputs, saving="save"), torch.float32, ARCHS["cpu"])
    logits = reference.router_logits(x, w.w_router) if spec.external_router else None    # an external router's
    choices = reference.table_choices(w.token_table, torch.randint(0, w.token_table.shape[0], (9,), generator=g)) \
        if spec.router.token_table else None                                         # a token table's rows
    env = fwd.program.run(moe_inputs(x, w, logits, choices), values=True)
    ref = interpret(fwd.graph, moe_inputs(x, w, logits, choices), values=True)
    roles = saved_values(fwd.graph)
    kept = int(env[roles["offsets"]][-1])              # rows past the kept pairs are not written
    for role in PRE_SAVED:
        if role in roles:
            rows = kept if not role.startswith("shared") else x.shape[0]
            torch.testing.assert_close(env[roles[role]][:rows], ref[roles[role]][:rows], rtol=1e-5, atol=1e-5)
    # (the routed experts of an input-scaled layer are recomputed: only its shared expert saves)
    assert {"shared_pre_gate" if spec.input_scaled else "pre_gate"} <= set(roles)


def test_inference_programs_store_nothing_more():
    spec, outputs = SPECS["qwen_aux"]
    c = compile_program(MoERecipe(spec, outputs), torch.float16, ARCHS["sm90"])
    assert not any(r in saved_values(c.graph) for r in PRE_SAVED)
    assert all("pre" not in n.outs for n in c.graph.nodes)


# ---- compiled modules ---------------------------------------------------------------------------

def _saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``model(x)``, parameters and x aside."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    # (after the call: a compiled layer's first call moves ModuleList experts into one stacked storage)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in kept.items() if ptr not in skip), out


@pytest.mark.parametrize("name", ["MixtralMoE", "QwenMoE", "StackedGatherBmmMoE"])
def test_activation_memory_is_never_above_eagers(name):
    torch.manual_seed(0)
    eager = getattr(zoo, name)(d=32, f=64).train()
    x = torch.randn(4, 16, 32, requires_grad=True)
    got = {"eager": _saved_bytes(eager, x)[0]}
    for policy in ("save", "recompute"):
        m = moec.compile(copy.deepcopy(eager), activations=policy)
        got[policy] = _saved_bytes(m, x)[0]
    assert got["recompute"] < got["save"] <= got["eager"], got
    spec = m.__dict__["_moec_region"].spec
    k, f = spec.router.top_k, spec.ffn
    assert got["save"] - got["recompute"] >= 64 * k * 2 * f * 4     # what the backward reads instead of recomputing


def test_explain_says_what_the_training_forward_kept():
    for policy, words in (("save", "saved by the forward"), ("recompute", "recomputed from x")):
        m = moec.compile(zoo.QwenMoE().train(), activations=policy)
        assert "training forward: not run yet" in m.explain()
        y, _ = m(torch.randn(4, 16, requires_grad=True))
        y.sum().backward()
        text = m.explain()
        assert words in text and "eager autograd keeps at least" in text, text


def test_a_model_saved_and_loaded_keeps_its_policy(tmp_path):
    m = moec.compile(zoo.MixtralMoE().train(), activations="save")
    torch.save(m, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    back(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert "saved by the forward" in back.explain()


def test_spec_with_a_wide_hidden_saves_by_default_on_a_gpu_arch():
    """``auto`` at a real hidden size: the sm90 training forward's fused GEMM stores pre and pre_up."""
    spec = MoESpec(1024, 512, RouterConfig(8, 2))
    c = compile_program(MoERecipe(spec, ("y",), saving="auto"), torch.bfloat16, ARCHS["sm90"])
    assert {"pre_gate", "pre_up"} <= set(saved_values(c.graph))
    small = compile_program(MoERecipe(MoESpec(16, 32, RouterConfig(4, 2)), ("y",), saving="auto"),
                            torch.bfloat16, ARCHS["sm90"])
    assert "pre_gate" not in saved_values(small.graph)
