"""MoBA's IR: golden text for the builder and every MoBA pass (text in -> pass -> text out, compared
exactly), each paired with numeric checks (the interpreter gives the same outputs after every pass,
and the lowered program's kernels match `moba_reference`), the verifier's rules, and the text form.

Regenerate the goldens after an intended change with ``MOEC_UPDATE_GOLDEN=1 pytest tests/test_moba_ir.py``
and review the diff.
"""
import os
from pathlib import Path

import pytest
import torch

from moec.ir import IRError, interpret, parse_graph, print_graph, verify
from moec.moba import moba_reference
from moec.ir.build import build_moba_graph
from moec.moba.config import MobaConfig
from moec.compiler import MobaRecipe, compile_program
from moec.passes.lower import lower
from moec.passes.pipeline import MOBA_PIPELINE, PassContext, PassError, run_passes
from moec.runtime.arch import ARCHS
from moec.runtime.launch import recording
from moec.passes.moba_tiles import attention_tile

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "moba_gqa": (MobaConfig(block_size=64, top_k=4, heads=8, kv_heads=2, head_dim=64), torch.float16),
    "moba_mha": (MobaConfig(block_size=16, top_k=3, heads=4, kv_heads=4, head_dim=32), torch.float32),
}
CTX = PassContext(ARCHS["sm90"])
STAGES = ["captured"] + [p.name for p in MOBA_PIPELINE]


def golden_path(case, i):
    return GOLDEN / f"{case}.{i:02d}.{STAGES[i]}.ir"


def _inputs(cfg: MobaConfig, B=2, N=45, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"q": torch.randn(B, cfg.heads, N, cfg.head_dim, generator=g).to(dtype),
            "k": torch.randn(B, cfg.kv_heads, N, cfg.head_dim, generator=g).to(dtype),
            "v": torch.randn(B, cfg.kv_heads, N, cfg.head_dim, generator=g).to(dtype)}


@pytest.mark.parametrize("case", CASES)
def test_builder_matches_captured_golden(case):
    cfg, dtype = CASES[case]
    text = print_graph(build_moba_graph(cfg, dtype))
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        golden_path(case, 0).write_text(text)
    assert text == golden_path(case, 0).read_text()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("i", range(1, len(STAGES)), ids=STAGES[1:])
def test_pass_golden(case, i):
    before = parse_graph(golden_path(case, i - 1).read_text())
    after = verify(MOBA_PIPELINE[i - 1].fn(before, CTX))
    text = print_graph(after)
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        golden_path(case, i).write_text(text)
    assert text == golden_path(case, i).read_text()
    assert print_graph(parse_graph(text)) == text          # the text form round-trips


def test_fusion_removes_the_score_matrix():
    """After fuse-block-gate no op implies an N x blocks tensor: the pool and the unfused gate are gone."""
    final = parse_graph(golden_path("moba_gqa", len(STAGES) - 1).read_text())
    assert [n.op for n in final.nodes] == ["fused_block_gate", "block_sparse_attention", "block_sparse_attention",
                                           "select"]
    assert all(n.attr["tiles"] for n in final.nodes if n.op != "select")


@pytest.mark.parametrize("case", CASES)
def test_every_stage_computes_the_same(case):
    """Interpreting the IR after each pass gives `moba_reference`'s output (N = 45: a partial block)."""
    cfg, _ = CASES[case]
    x = _inputs(cfg)
    ref = moba_reference(x["q"], x["k"], x["v"], block_size=cfg.block_size, top_k=cfg.top_k)[0]
    for i in range(len(STAGES)):
        g = parse_graph(golden_path(case, i).read_text())
        g = g.__class__(g.name, tuple((n, t.__class__("f32", t.shape)) for n, t in g.inputs), g.nodes, g.outputs)
        out = interpret(g, x)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=f"stage {STAGES[i]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [1, 16, 45])
def test_lowered_program_runs_the_kernels(dtype, N):
    cfg = MobaConfig(block_size=16, top_k=3, heads=4, kv_heads=2, head_dim=16)
    c = compile_program(MobaRecipe(cfg), dtype, ARCHS["cpu"])
    x = _inputs(cfg, N=N, dtype=dtype)
    with recording() as launches:
        out = c.program.run(x)[0]
    assert {r.kernel.fn_name.split("_bs")[0] for r in launches} == {"moec_moba_gate", "moec_moba_attention"}
    ref = moba_reference(x["q"], x["k"], x["v"], block_size=16, top_k=3)[0]
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and out.shape == x["q"].shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert [s.node.op for s in c.program.steps if s.variants] == ["fused_block_gate", "block_sparse_attention",
                                                               "block_sparse_attention"]
    assert [name for name, _ in c.stages] == STAGES
    assert c.tiles()["indices"]["buckets"]["every T"]["kernel"] == "moec_moba_gate_bs16_k3"


def test_unfused_graph_lowers_too():
    """Without fuse-block-gate the pooling and the gate run as torch code (the interpreter's), so any
    graph is runnable; only the attention needs a tile."""
    cfg = MobaConfig(block_size=8, top_k=2, heads=2, kv_heads=1, head_dim=16)
    g = build_moba_graph(cfg, torch.float32)
    tile = {None: attention_tile(8, 16, "cpu")}
    g = g.with_nodes([n.replace(attrs={"tiles": tile}) if n.op == "block_sparse_attention" else n for n in g.nodes])
    p = lower(verify(g), "cpu")
    assert [s.node.op for s in p.steps if s.kernel is None] == ["block_pool", "block_gate"]
    x = _inputs(cfg, N=20)
    torch.testing.assert_close(p.run(x)[0], moba_reference(x["q"], x["k"], x["v"], block_size=8, top_k=2)[0],
                               rtol=1e-4, atol=1e-4)


BAD = {
    "heads": ("%q: f32[B, 3, T, 16], %k: f32[B, 2, T, 16]", 3, "multiple of the kv heads"),
    "head_dim": ("%q: f32[B, 4, T, 16], %k: f32[B, 2, T, 32]", 4, "does not match q"),
    "batch": ("%q: f32[B, 4, T, 16], %k: f32[2, 2, T, 16]", 4, "does not match q"),
}


@pytest.mark.parametrize("what", BAD)
def test_verifier_rejects(what):
    params, heads, msg = BAD[what]
    text = (f"graph g({params}) {{\n"
            f"  %i: i32[B, {heads}, T, 2] = fused_block_gate(q=%q, k=%k) {{block_size=8, top_k=2}}\n"
            "  return %i\n}\n")
    with pytest.raises(IRError, match=msg):
        verify(parse_graph(text))


def test_verifier_rejects_bad_attributes_and_tiles():
    g = build_moba_graph(MobaConfig(16, 3, 4, 2, 16), torch.float32)
    bad = g.with_nodes([n.replace(attrs={"block_size": 0}) if n.op == "block_pool" else n for n in g.nodes])
    with pytest.raises(IRError, match="block_size must be a positive int"):
        verify(bad)
    tiles = g.with_nodes([n.replace(attrs={"tiles": {None: "x"}}) if n.op == "block_sparse_attention" else n
                          for n in g.nodes])
    with pytest.raises(IRError, match="tiles must be"):
        verify(tiles)
    with pytest.raises(PassError, match="'verify' failed"):
        run_passes(bad, CTX, passes=MOBA_PIPELINE)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        MobaConfig(16, 3, 6, 4, 16)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        MobaConfig(16, 0, 4, 4, 16)
