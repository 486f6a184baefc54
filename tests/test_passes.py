"""Golden IR-text tests for every pass (text in -> pass -> text out, compared exactly), each
paired with a numeric check: the reference interpreter gives the same outputs before and after.

Regenerate the goldens after an intended change with ``MOEC_UPDATE_GOLDEN=1 pytest tests/test_passes.py``
and review the diff.
"""
import os
from pathlib import Path

import pytest
import torch

from moec.ir import build_moe_graph, interpret, parse_graph, print_graph, verify
from moec.ir.types import DTYPES
from moec.passes.pipeline import PIPELINE, PassContext, PassError, run_passes
from moec.runtime.arch import ARCHS
from moec.spec import MoESpec, RouterConfig, SharedExpertConfig

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "mixtral": (MoESpec(64, 128, RouterConfig(8, 2, order="topk_then_score")), "f16", ("y",)),
    "deepseek": (MoESpec(64, 32, RouterConfig(16, 4, score="sigmoid", score_bias=True, n_group=4, topk_group=2,
                                              group_score="top2_sum", renormalize=True, routed_scaling=2.5),
                         shared=SharedExpertConfig(64)), "bf16", ("y",)),
    "qwen_aux": (MoESpec(64, 32, RouterConfig(8, 2, aux_loss=True), shared=SharedExpertConfig(48, gated=True)),
                 "f32", ("y", "aux")),
    "switch_capacity": (MoESpec(64, 256, RouterConfig(4, 1, capacity_factor=1.25, overflow="next_best"),
                                glu=False, activation="relu"), "f32", ("y", "logits")),
    "noisy": (MoESpec(32, 64, RouterConfig(8, 2, order="topk_then_score", noisy=True)), "f32", ("y",)),
    "gpt_oss": (MoESpec(64, 32, RouterConfig(8, 2, order="topk_then_score", router_bias=True), expert_bias=True,
                        act_alpha=1.702, glu_limit=7.0, up_shift=1.0), "bf16", ("y", "weights")),
    # Switch Transformer: a fixed capacity per expert and sequence, a dropped token passes through
    "switch_pass": (MoESpec(64, 256, RouterConfig(4, 1, expert_capacity=8, capacity_per="sequence", dropped="pass"),
                            glu=False, activation="relu"), "f32", ("y", "logits")),
    # LongCat-Flash: 8 MLP experts and 4 identity experts behind one softmax router, a shared expert
    "identity": (MoESpec(64, 32, RouterConfig(12, 4, score_bias=True, routed_scaling=2.0), identity_experts=4,
                         shared=SharedExpertConfig(32)), "bf16", ("y",)),
    # Llama4: top-1 of the logits, its sigmoid scales the expert's input (a scaled permute, a plain combine)
    "llama4": (MoESpec(64, 32, RouterConfig(16, 1, score="sigmoid", order="logits_then_score"), input_scaled=True,
                       shared=SharedExpertConfig(32)), "bf16", ("y", "logits")),
    # Ergo's expert norms: each expert's output rows RMS-normalised by its own scale before the weighted combine
    "expert_norm": (MoESpec(64, 32, RouterConfig(8, 2, score="sigmoid", score_bias=True, renormalize=True),
                            glu=False, activation="relu2", expert_norm=1e-6), "bf16", ("y",)),
    # an external router (an MLP the layer calls): its logits are an input the routing kernel reads
    "external_router": (MoESpec(64, 32, RouterConfig(8, 2, score="sigmoid", score_bias=True, renormalize=True,
                                                     aux_loss=True), external_router=True,
                                shared=SharedExpertConfig(32)), "f16", ("y", "aux")),
    # DeepSeek-V4's hash layers: the choices are a graph input (the token table's rows), only weighted
    "token_table": (MoESpec(64, 32, RouterConfig(8, 2, score="sqrtsoftplus", renormalize=True, routed_scaling=1.5,
                                                 token_table=True), glu_limit=10.0,
                            shared=SharedExpertConfig(32)), "bf16", ("y",)),
}
CTX = PassContext(ARCHS["sm90"])
STAGES = ["captured"] + [p.name for p in PIPELINE]


def golden_path(case, i):
    return GOLDEN / f"{case}.{i:02d}.{STAGES[i]}.ir"


def test_goldens_are_complete():
    for case in CASES:
        for i in range(len(STAGES)):
            assert golden_path(case, i).exists(), golden_path(case, i)


@pytest.mark.parametrize("case", CASES)
def test_builder_matches_captured_golden(case):
    spec, dt, outs = CASES[case]
    text = print_graph(build_moe_graph(spec, DTYPES[dt], outs))
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        golden_path(case, 0).write_text(text)
    assert text == golden_path(case, 0).read_text()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("i", range(1, len(STAGES)), ids=STAGES[1:])
def test_pass_golden(case, i):
    before = parse_graph(golden_path(case, i - 1).read_text())
    after = verify(PIPELINE[i - 1].fn(before, CTX))
    text = print_graph(after)
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        golden_path(case, i).write_text(text)
    assert text == golden_path(case, i).read_text()
    assert print_graph(parse_graph(text)) == text          # the text form round-trips


def _inputs(g, T, seed):
    gen = torch.Generator().manual_seed(seed)
    vals = {}
    for name, t in g.inputs:
        shape = t.concrete(T=T)
        scale = 1.0 if name in ("x", "w_router", "score_bias", "shared_gate_proj", "w_noise") else 0.2
        dtype = torch.float32 if t.dtype == "bf16" else t.torch_dtype   # the interpreter is exact in fp32
        vals[name] = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return vals


@pytest.mark.parametrize("case", CASES)
def test_every_stage_computes_the_same(case):
    """Interpreting the IR after each pass gives the captured graph's outputs."""
    graphs = [parse_graph(golden_path(case, i).read_text()) for i in range(len(STAGES))]
    graphs = [parse_graph(print_graph(g).replace("bf16", "f32")) for g in graphs]   # bf16 cases run in fp32
    for seed, T in enumerate((0, 1, 9)):
        inputs = _inputs(graphs[0], T, seed)
        noise = torch.randn(T, 8, generator=torch.Generator().manual_seed(99))
        want = interpret(graphs[0], inputs, training=True, noise=noise)
        for i, g in enumerate(graphs[1:], 1):
            got = interpret(g, inputs, training=True, noise=noise)
            for a, b in zip(want, got):
                tol = 1e-2 if a.dtype == torch.float16 else 1e-5   # fusion drops fp16 roundings
                torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol, msg=f"after {STAGES[i]}")


def test_pipeline_error_names_the_pass():
    spec, dt, outs = CASES["mixtral"]
    g = build_moe_graph(spec, DTYPES[dt], outs)
    broken = g.with_nodes(g.nodes[1:])          # the route's logits are no longer defined
    with pytest.raises(PassError, match="pass 'verify' failed"):
        run_passes(broken, CTX)


def test_print_after(capsys, monkeypatch):
    monkeypatch.setenv("MOEC_PRINT_AFTER", "fuse-routing")
    spec, dt, outs = CASES["mixtral"]
    run_passes(build_moe_graph(spec, DTYPES[dt], outs), CTX)
    err = capsys.readouterr().err
    assert "IR after fuse-routing" in err and "fused_route(" in err and "IR after fold-permute" not in err
