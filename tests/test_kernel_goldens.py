"""Golden generated kernels: the rendered Triton source of a representative set of kernels (every
template, its main variants, token-count buckets, MoE and MoBA, GPU and interpreter tiles), pinned
as files under ``tests/golden/kernels/<case>/``.

A change that should not alter generated code must leave every file identical; a change that does
is reviewed as the diff of these files. Regenerate after an intended change with
``MOEC_UPDATE_GOLDEN=1 pytest tests/test_kernel_goldens.py`` and read the diff.
"""
import os
from pathlib import Path

import pytest
import torch

from moec.compiler import BackwardRecipe, ExpertsRecipe, MobaRecipe, MoERecipe, compile_program
from moec.moba.config import MobaConfig
from moec.runtime.arch import ARCHS
from moec.spec import MoESpec, RouterConfig, SharedExpertConfig

GOLDEN = Path(__file__).parent / "golden" / "kernels"
DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

MOE = {
    "mixtral": (MoESpec(64, 128, RouterConfig(8, 2, order="topk_then_score")), "f16", ("y",)),
    "deepseek": (MoESpec(64, 32, RouterConfig(16, 4, score="sigmoid", score_bias=True, n_group=4, topk_group=2,
                                              group_score="top2_sum", renormalize=True, routed_scaling=2.5),
                         shared=SharedExpertConfig(64)), "bf16", ("y",)),
    "qwen_aux": (MoESpec(64, 32, RouterConfig(8, 2, aux_loss=True), shared=SharedExpertConfig(48, gated=True)),
                 "f32", ("y", "aux", "logits")),
    "switch_capacity": (MoESpec(64, 256, RouterConfig(4, 1, capacity_factor=1.25, overflow="next_best"),
                                glu=False, activation="relu"), "f32", ("y", "logits")),
    "noisy": (MoESpec(32, 64, RouterConfig(8, 2, order="topk_then_score", noisy=True)), "f32", ("y",)),
    "gpt_oss": (MoESpec(64, 32, RouterConfig(8, 2, order="topk_then_score", router_bias=True), expert_bias=True,
                        act_alpha=1.702, glu_limit=7.0, up_shift=1.0), "bf16", ("y", "weights")),
    # Llama4: the routing weight scales each expert's input (the gate/up GEMM's accumulators, before the SwiGLU)
    "llama4": (MoESpec(64, 32, RouterConfig(16, 1, score="sigmoid", order="logits_then_score"), input_scaled=True,
                       shared=SharedExpertConfig(32)), "bf16", ("y", "logits")),
    # Ergo's expert norms: the norm's kernel takes the routing weights and the un-permute
    "expert_norm": (MoESpec(64, 32, RouterConfig(8, 2, score="sigmoid", score_bias=True, renormalize=True),
                            glu=False, activation="relu2", expert_norm=1e-6), "bf16", ("y",)),
    # an external router: the routing kernel reads the given logits (no GEMM); the backward yields their gradient
    "external_router": (MoESpec(64, 32, RouterConfig(8, 2, score="sigmoid", score_bias=True, renormalize=True,
                                                     aux_loss=True), external_router=True,
                                shared=SharedExpertConfig(32)), "f16", ("y", "aux")),
    # DeepSeek-V4's hash layers: each token's choices are its token-table row (a graph input), weighted by
    # sqrt(softplus) scores
    "token_table": (MoESpec(64, 32, RouterConfig(8, 2, score="sqrtsoftplus", renormalize=True, routed_scaling=1.5,
                                                 token_table=True), glu_limit=10.0,
                            shared=SharedExpertConfig(32)), "bf16", ("y",)),
}
EXPERTS = {   # transformers' experts interface: (E, k, d, f, activation, glu, dtype, bias, variant)
    "experts_silu_glu": (8, 2, 64, 128, "silu", True, torch.float16, False, ()),
    "experts_gelu": (4, 1, 32, 64, "gelu", False, torch.float32, False, ()),
    "experts_gpt_oss": (8, 2, 64, 32, "silu", True, torch.bfloat16, True,
                        (("act_alpha", 1.702), ("glu_limit", 7.0), ("up_shift", 1.0))),
}
MOBA = {
    "moba_gqa": (MobaConfig(block_size=64, top_k=4, heads=8, kv_heads=2, head_dim=64), torch.float16),
    "moba_mha": (MobaConfig(block_size=16, top_k=3, heads=4, kv_heads=4, head_dim=32), torch.float32),
}


def _program_kernels(c) -> dict:
    return {f"{step.node.name}.{kernel.fn_name}.py": kernel.source for step, kernel in c.program.kernels()}


def generate(case: str) -> dict:
    """``{file name: source}`` of every kernel of one golden case ``<name>.<arch>``: the programs the
    compile driver makes (MoBA: one sequence per batch row and packed sequences, each with both
    attention schemes)."""
    name, arch = case.rsplit(".", 1)
    if name.endswith(".backward"):        # the backward's kernels (moec.ir.backward)
        name = name[:-len(".backward")]
        if name in MOE:
            spec, dt, outs = MOE[name]
            return _program_kernels(compile_program(BackwardRecipe(MoERecipe(spec, outs)), DT[dt], ARCHS[arch]))
        if name in MOBA:
            cfg, dtype = MOBA[name]
            out = {}
            for varlen in (False, True):
                c = compile_program(BackwardRecipe(MobaRecipe(cfg, varlen=varlen)), dtype, ARCHS[arch])
                out.update({f"{'varlen.' if varlen else ''}{f}": src for f, src in _program_kernels(c).items()})
            return out
        E, k, d, f, act, glu, dtype, bias, variant = EXPERTS[name]
        recipe = ExpertsRecipe(E, k, d, f, act, glu, bias, variant)
        return _program_kernels(compile_program(BackwardRecipe(recipe), dtype, ARCHS[arch]))
    if name in MOE:
        spec, dt, outs = MOE[name]
        return _program_kernels(compile_program(MoERecipe(spec, outs), DT[dt], ARCHS[arch]))
    if name in EXPERTS:
        E, k, d, f, act, glu, dtype, bias, variant = EXPERTS[name]
        return _program_kernels(compile_program(ExpertsRecipe(E, k, d, f, act, glu, bias, variant), dtype, ARCHS[arch]))
    cfg, dtype = MOBA[name]
    out = {}
    for varlen in (False, True):
        c = compile_program(MobaRecipe(cfg, varlen=varlen), dtype, ARCHS[arch])
        out.update({f"{'varlen.' if varlen else ''}{f}": src for f, src in _program_kernels(c).items()})
    return out


# every case with sm90's tiles (token-count buckets), a few with the interpreter's and other arches'
CASES = [f"{n}.sm90" for n in (*MOE, *EXPERTS, *MOBA)] + \
        ["mixtral.cpu", "gpt_oss.cpu", "experts_gelu.cpu", "moba_mha.cpu", "mixtral.sm80", "deepseek.sm100",
         "moba_gqa.sm100"] + \
        [f"{n}.backward.{a}" for n in ("qwen_aux", "gpt_oss", "experts_gelu", "moba_gqa") for a in ("sm90", "cpu")] + \
        ["llama4.backward.sm90", "external_router.backward.sm90", "token_table.backward.sm90"]


@pytest.fixture(autouse=True)
def _no_tune_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEC_TUNE_FILE", str(tmp_path / "none.json"))     # tiles from the cost model only


@pytest.mark.parametrize("case", CASES)
def test_kernels_match_golden(case):
    got = generate(case)
    d = GOLDEN / case
    if os.environ.get("MOEC_UPDATE_GOLDEN"):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.py"):
            old.unlink()
        for fname, src in got.items():
            (d / fname).write_text(src)
    want = {p.name: p.read_text() for p in sorted(d.glob("*.py"))}
    assert sorted(got) == sorted(want), f"{case}: kernel set changed"
    for fname in want:
        assert got[fname] == want[fname], f"{case}/{fname} differs from the golden"


# the kernel name each template renders (a new template must be added here, and so get goldens)
TEMPLATE_KERNELS = {"route": "moec_route", "grouped_gemm": "grouped_gemm", "reduce_topk": "reduce_topk",
                    "grouped_dgrad": "grouped_dgrad", "grouped_wgrad": "grouped_wgrad",
                    "moba_gate": "moec_moba_gate", "moba_attention": "moec_moba_attention",
                    "moba_window": "moec_moba_window",
                    "moba_bwd_dq": "moec_moba_bwd_dq", "moba_bwd_dkdv": "moec_moba_bwd_dkdv",
                    "tile_schedule": "tile_schedule", "expert_norm": "expert_norm"}


def test_every_template_is_pinned():
    from moec import templates
    names = {p.name.split(".")[0] for p in Path(templates.__file__).parent.glob("*.jinja")
             if not p.name.startswith("_")}      # "_x.jinja": a piece other templates include
    assert names == set(TEMPLATE_KERNELS)
    firsts = {p.read_text().splitlines()[0] for p in GOLDEN.rglob("*.py")}
    for name, kernel in TEMPLATE_KERNELS.items():
        assert any(f.startswith(f"# moec kernel {kernel}") for f in firsts), f"template {name} has no golden kernel"
