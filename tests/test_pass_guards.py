"""Must-not-fire tests: for every guard of every rewriting pass, a small hand-written graph on which that
one guard does not hold, so the pass must leave the graph alone (it prints exactly as it came in and
still verifies). Each test is named after its guard; where the blocked rewrite would be unsound and
that is cheap to show, the reference interpreter runs the input graph and the graph the pass would
produce without the guard (``*_WOULD_BE``, written out by hand) and they differ.

Each guarded case also has a positive control (``test_<pass>_fires_on_the_base_case``): the same graph
with the guard satisfied is rewritten, so a must-not-fire test cannot pass because the pass never fires.

Passes without guards (verify, infer-shapes, choose-tiles) are checked to change nothing they must not;
every pass is idempotent on its own golden output.

Seven of these once failed (the pass rewrote where it must not and produced an ill-formed or wrong
graph): noise logits that are an input or have other readers, logits or a shared gate's scale read
before the route, two shared gates of one x, a GEMM whose own ``order`` differs from the permute's or
the combine's, and an ``add`` reading the routed sum twice (``Graph.uses`` now counts operand slots).
"""
import textwrap
from pathlib import Path

import pytest
import torch

from moec.ir import interpret, parse_graph, print_graph, verify
from moec.ir.ops import PROVENANCE_ATTRS, is_kernel
from moec.passes.canonicalize_router import canonicalize_router
from moec.passes.choose_moba_scheme import choose_moba_scheme
from moec.passes.choose_tiles import choose_tiles
from moec.passes.fold_combine import fold_combine
from moec.passes.fold_permute import fold_permute
from moec.passes.fuse_activation import fuse_activation
from moec.passes.fuse_block_gate import fuse_block_gate
from moec.passes.fuse_dispatch import fuse_dispatch
from moec.passes.fuse_routing import fuse_routing
from moec.passes.infer_shapes import infer_shapes
from moec.passes.save_activations import save_activations
from moec.passes.pipeline import PIPELINES, PassContext
from moec.runtime.arch import ARCHS

CTX = PassContext(ARCHS["sm90"])
GOLDEN = Path(__file__).parent / "golden"


# ---- helpers ------------------------------------------------------------------------------------

def ir(text: str):
    """Parse ``text`` (written in the printer's canonical form, so what is tested is what is read) and verify it."""
    text = textwrap.dedent(text).strip() + "\n"
    g = parse_graph(text)
    assert print_graph(g) == text, "test input is not in canonical text form"
    return verify(g)


def assert_unchanged(pass_fn, text: str):
    g = ir(text)
    out = pass_fn(g, CTX)
    assert print_graph(out) == print_graph(g)
    verify(out)


def assert_rewrites_to(pass_fn, text: str, expected: str):
    out = verify(pass_fn(ir(text), CTX))
    assert print_graph(out) == print_graph(ir(expected))


def _inputs(g, sizes: dict, given: dict | None = None, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vals = {}
    for name, t in g.inputs:
        if given and name in given:
            vals[name] = given[name]
            continue
        shape = t.concrete(**sizes)
        if t.dtype == "i32":                  # a row order: a permutation
            assert len(shape) == 1, name
            vals[name] = torch.randperm(shape[0], generator=gen).to(torch.int32)
        else:
            vals[name] = torch.randn(shape, generator=gen).to(t.torch_dtype)
    return vals


def assert_blocked_rewrite_is_wrong(before: str, would_be: str, sizes: dict, given=None, **run):
    """The graph the pass would produce without the guard is well formed but computes something else."""
    g0, g1 = ir(before), ir(would_be)
    assert g0.inputs == g1.inputs
    inputs = _inputs(g0, sizes, given)
    want, got = interpret(g0, inputs, **run), interpret(g1, inputs, **run)
    assert len(want) == len(got)
    assert any(a.shape != b.shape or not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4)
               for a, b in zip(want, got)), "the blocked rewrite computes the same: the guard would not matter"


def _noise(T, E=4):
    return torch.randn(T, E, generator=torch.Generator().manual_seed(7))


# ==== canonicalize-router ========================================================================
# Guards: (1) only `route` nodes; (2) only order='topk_then_score' becomes score_then_topk+renormalize;
# (3) group selection is dropped only when n_group > 1 and (4) topk_group == n_group.

ROUTER = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16]) {{
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {{num_experts=4, top_k=2{attrs}}}
  return %ids, %weights
}}
"""


def test_canonicalize_router_fires_on_the_base_case():
    """Positive control: topk_then_score and all-groups selection are canonicalised."""
    assert_rewrites_to(canonicalize_router, ROUTER.format(attrs=", order='topk_then_score'"),
                       ROUTER.format(attrs=", renormalize=True"))
    assert_rewrites_to(canonicalize_router, ROUTER.format(attrs=", n_group=2, topk_group=2, group_score='top2_sum'"),
                       ROUTER.format(attrs=""))


def test_canonicalize_router_order_guard_keeps_unrenormalised_score_then_topk():
    """Guard order == 'topk_then_score': a score_then_topk router without renormalize must not gain one (weights change)."""
    assert_unchanged(canonicalize_router, ROUTER.format(attrs=""))
    assert_blocked_rewrite_is_wrong(ROUTER.format(attrs=""), ROUTER.format(attrs=", renormalize=True"), {"T": 9})


def test_canonicalize_router_topk_group_guard_keeps_group_limited_selection():
    """Guard topk_group == n_group: dropping groups when only some are kept would widen the selection."""
    attrs = ", n_group=2"                      # topk_group=1 (the default): one group of two kept
    assert_unchanged(canonicalize_router, ROUTER.format(attrs=attrs))
    assert_blocked_rewrite_is_wrong(ROUTER.format(attrs=attrs), ROUTER.format(attrs=""), {"T": 16})


def test_canonicalize_router_n_group_guard_keeps_ungrouped_router():
    """Guard n_group > 1: an ungrouped router is already canonical; rewriting would reset its (unused) group_score."""
    # semantically redundant: with n_group=1 group_score is never read, so only the text would change
    assert_unchanged(canonicalize_router, ROUTER.format(attrs=", group_score='top2_sum'"))


def test_canonicalize_router_route_guard_leaves_apply_capacity_alone():
    """Guard op == 'route': other nodes holding a RouterConfig (apply_capacity) are not routers to canonicalise."""
    assert_unchanged(canonicalize_router, """
        graph moe(%ids0: i32[T, 2], %weights0: f32[T, 2], %logits: f32[T, 4]) {
          %ids: i32[T, 2], %weights: f32[T, 2] = apply_capacity(ids=%ids0, weights=%weights0, logits=%logits) {num_experts=4, top_k=2, order='topk_then_score', capacity_factor=1.0}
          return %ids, %weights
        }""")


# ==== fuse-routing ===============================================================================
# Guards: (1) logits come from a `linear` or are a graph input (given: then no noise); (2) the noise logits come from a `linear` (3) of the same x
# (4) read only by the route; (5) not capacity and noisy together; (6) only the first shared_gate of the
# same x is absorbed; (7) nothing reads the logits or that gate's scale before the route.

FUSE_ROUTING_BASE = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16], %w_sg: f32[1, 16]) {
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %noise_logits: f32[T, 4] = linear(x=%x, w=%w_noise)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, noise_logits=%noise_logits) {num_experts=4, top_k=2, renormalize=True, noisy=True}
  %scale: f32[T] = shared_gate(x=%x, w=%w_sg)
  return %ids, %weights, %scale
}
"""


def test_fuse_routing_fires_on_the_base_case():
    """Positive control: the router GEMM, the noise GEMM and the shared gate of one x become one fused_route."""
    assert_rewrites_to(fuse_routing, FUSE_ROUTING_BASE, """
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16], %w_sg: f32[1, 16]) {
          %ids: i32[T, 2], %weights: f32[T, 2], _, _, _, _, %scale: f32[T] = fused_route(x=%x, w=%w_router, w_noise=%w_noise, w_shared_gate=%w_sg) {num_experts=4, top_k=2, renormalize=True, noisy=True}
          return %ids, %weights, %scale
        }""")


def test_fuse_routing_reads_given_logits():
    """Logits that are a graph input (an external router's) are read by the kernel: no GEMM, the selection bias
    kept; the capacity stage reads the same input."""
    assert_rewrites_to(fuse_routing, """
        graph moe(%logits: f32[T, 4], %sb: f32[4]) {
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, score_bias=%sb) {num_experts=4, top_k=2, score_bias=True, capacity_factor=1.0}
          return %ids, %weights
        }""", """
        graph moe(%logits: f32[T, 4], %sb: f32[4]) {
          %ids_routed: i32[T, 2], %weights_routed: f32[T, 2] = fused_route(logits=%logits, score_bias=%sb) {num_experts=4, top_k=2, score_bias=True}
          %ids: i32[T, 2], %weights: f32[T, 2] = apply_capacity(ids=%ids_routed, weights=%weights_routed, logits=%logits, score_bias=%sb) {num_experts=4, top_k=2, score_bias=True, capacity_factor=1.0}
          return %ids, %weights
        }""")


def test_fuse_routing_logits_guard_needs_a_linear_or_an_input():
    """Guard logits = linear(x, w) or a graph input: logits another node computes (here a cast) have neither x and
    w for the kernel's GEMM nor memory the kernel may read before that node runs."""
    assert_unchanged(fuse_routing, """
        graph moe(%logits16: f16[T, 4]) {
          %logits: f32[T, 4] = cast(x=%logits16) {dtype='f32'}
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=4, top_k=2}
          return %ids, %weights
        }""")


def test_fuse_routing_given_logits_guard_no_noise():
    """Guard: given logits with noise logits stay unfused (the kernel draws its noise on a projection it computes)."""
    assert_unchanged(fuse_routing, """
        graph moe(%logits: f32[T, 4], %noise_logits: f32[T, 4]) {
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, noise_logits=%noise_logits) {num_experts=4, top_k=2, renormalize=True, noisy=True}
          return %ids, %weights
        }""")


def test_fuse_routing_noise_linear_guard_needs_a_noise_projection():
    """Guard noise_logits = linear(...): other noise logits (here a sum) are not x @ w_noise.T, which the kernel computes."""
    assert_unchanged(fuse_routing, """
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16]) {
          %logits: f32[T, 4] = linear(x=%x, w=%w_router)
          %n0: f32[T, 4] = linear(x=%x, w=%w_noise)
          %noise_logits: f32[T, 4] = add(a=%n0, b=%logits)
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, noise_logits=%noise_logits) {num_experts=4, top_k=2, renormalize=True, noisy=True}
          return %ids, %weights
        }""")


NOISE_OTHER_X = """
graph moe(%x: f32[T, 16], %x2: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16]) {
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %noise_logits: f32[T, 4] = linear(x=%x2, w=%w_noise)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, noise_logits=%noise_logits) {num_experts=4, top_k=2, renormalize=True, noisy=True}
  return %ids, %weights
}
"""
NOISE_OTHER_X_WOULD_BE = """
graph moe(%x: f32[T, 16], %x2: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16]) {
  %ids: i32[T, 2], %weights: f32[T, 2] = fused_route(x=%x, w=%w_router, w_noise=%w_noise) {num_experts=4, top_k=2, renormalize=True, noisy=True}
  return %ids, %weights
}
"""


def test_fuse_routing_noise_x_guard_needs_the_same_x():
    """Guard noise.x == x: the fused kernel projects the router's x for the noise, not another tensor's rows."""
    assert_unchanged(fuse_routing, NOISE_OTHER_X)
    assert_blocked_rewrite_is_wrong(NOISE_OTHER_X, NOISE_OTHER_X_WOULD_BE, {"T": 16}, training=True, noise=_noise(16))


NOISY_CAPACITY = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16]) {
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %noise_logits: f32[T, 4] = linear(x=%x, w=%w_noise)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, noise_logits=%noise_logits) {num_experts=4, top_k=2, renormalize=True, capacity_factor=1.0, overflow='next_best', noisy=True}
  return %ids, %weights
}
"""
NOISY_CAPACITY_WOULD_BE = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16]) {
  %ids_routed: i32[T, 2], %weights_routed: f32[T, 2], _, _, _, _, _, %logits: f32[T, 4] = fused_route(x=%x, w=%w_router, w_noise=%w_noise) {num_experts=4, top_k=2, renormalize=True, noisy=True}
  %ids: i32[T, 2], %weights: f32[T, 2] = apply_capacity(ids=%ids_routed, weights=%weights_routed, logits=%logits) {num_experts=4, top_k=2, renormalize=True, capacity_factor=1.0, overflow='next_best', noisy=True}
  return %ids, %weights
}
"""


def test_fuse_routing_capacity_guard_keeps_noisy_capacity_unfused():
    """Guard not (capacity and noisy): capacity ranks pairs by the noisy scores, which only the unfused route keeps."""
    assert_unchanged(fuse_routing, NOISY_CAPACITY)
    assert_blocked_rewrite_is_wrong(NOISY_CAPACITY, NOISY_CAPACITY_WOULD_BE, {"T": 16}, training=True, noise=_noise(16))


SHARED_GATE_OTHER_X = """
graph moe(%x: f32[T, 16], %x2: f32[T, 16], %w_router: f32[4, 16], %w_sg: f32[1, 16]) {
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=4, top_k=2}
  %scale: f32[T] = shared_gate(x=%x2, w=%w_sg)
  return %ids, %weights, %scale
}
"""
SHARED_GATE_OTHER_X_WOULD_BE = """
graph moe(%x: f32[T, 16], %x2: f32[T, 16], %w_router: f32[4, 16], %w_sg: f32[1, 16]) {
  %ids: i32[T, 2], %weights: f32[T, 2], _, _, _, _, %scale: f32[T] = fused_route(x=%x, w=%w_router, w_shared_gate=%w_sg) {num_experts=4, top_k=2}
  return %ids, %weights, %scale
}
"""


def test_fuse_routing_shared_gate_guard_needs_the_same_x():
    """Guard shared_gate.x == x: a shared gate of other rows stays its own node (the route itself is still fused)."""
    assert_rewrites_to(fuse_routing, SHARED_GATE_OTHER_X, """
        graph moe(%x: f32[T, 16], %x2: f32[T, 16], %w_router: f32[4, 16], %w_sg: f32[1, 16]) {
          %ids: i32[T, 2], %weights: f32[T, 2] = fused_route(x=%x, w=%w_router) {num_experts=4, top_k=2}
          %scale: f32[T] = shared_gate(x=%x2, w=%w_sg)
          return %ids, %weights, %scale
        }""")
    assert_blocked_rewrite_is_wrong(SHARED_GATE_OTHER_X, SHARED_GATE_OTHER_X_WOULD_BE, {"T": 9})


def test_fuse_routing_guard_noise_logits_from_an_input():
    """Guard: noise logits with no producer cannot be recomputed in the kernel."""
    assert_unchanged(fuse_routing, """
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %noise_logits: f32[T, 4]) {
          %logits: f32[T, 4] = linear(x=%x, w=%w_router)
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, noise_logits=%noise_logits) {num_experts=4, top_k=2, renormalize=True, noisy=True}
          return %ids, %weights
        }""")


def test_fuse_routing_guard_noise_linear_with_another_use():
    """Guard: the noise projection must have one use (or be kept) before it is folded into the kernel."""
    g = ir("""
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_noise: f32[4, 16]) {
          %logits: f32[T, 4] = linear(x=%x, w=%w_router)
          %noise_logits: f32[T, 4] = linear(x=%x, w=%w_noise)
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits, noise_logits=%noise_logits) {num_experts=4, top_k=2, renormalize=True, noisy=True}
          return %ids, %weights, %noise_logits
        }""")
    verify(fuse_routing(g, CTX))


def test_fuse_routing_guard_logits_read_before_the_route():
    """Guard (ordering): logits read between the linear and the route must stay defined before their reader."""
    g = ir("""
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16]) {
          %logits: f32[T, 4] = linear(x=%x, w=%w_router)
          %l2: f32[T, 4] = add(a=%logits, b=%logits)
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=4, top_k=2}
          return %ids, %weights, %l2
        }""")
    verify(fuse_routing(g, CTX))


def test_fuse_routing_guard_two_shared_gates_of_one_x():
    """Guard: only one shared gate can be absorbed; the others must stay."""
    g = ir("""
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %g1: f32[1, 16], %g2: f32[1, 16]) {
          %logits: f32[T, 4] = linear(x=%x, w=%w_router)
          %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=4, top_k=2}
          %s1: f32[T] = shared_gate(x=%x, w=%g1)
          %s2: f32[T] = shared_gate(x=%x, w=%g2)
          return %ids, %weights, %s1, %s2
        }""")
    verify(fuse_routing(g, CTX))


# ==== fuse-dispatch ==============================================================================
# Guards: (1) the dispatch's ids are a fused_route's own (not capacity's or identity experts', not a graph
# input's);
# (2) a fused_route that already groups its pairs is left alone.

DISPATCH_BASE = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16]) {
  %ids: i32[T, 2], %weights: f32[T, 2] = fused_route(x=%x, w=%w_router) {num_experts=4, top_k=2}
  %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids) {num_experts=4}
  return %weights, %order, %offsets
}
"""


def test_fuse_dispatch_fires_on_the_base_case():
    """Positive control: the routing kernel's own ids are grouped by expert in that kernel."""
    assert_rewrites_to(fuse_dispatch, DISPATCH_BASE, """
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16]) {
          %ids: i32[T, 2], %weights: f32[T, 2], %order: i32[2*T], %offsets: i32[5] = fused_route(x=%x, w=%w_router) {num_experts=4, top_k=2}
          return %weights, %order, %offsets
        }""")


DISPATCH_AFTER_CAPACITY = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16]) {
  %ids_routed: i32[T, 2], %weights_routed: f32[T, 2], _, _, _, _, _, %logits: f32[T, 4] = fused_route(x=%x, w=%w_router) {num_experts=4, top_k=2}
  %ids: i32[T, 2], %weights: f32[T, 2] = apply_capacity(ids=%ids_routed, weights=%weights_routed, logits=%logits) {num_experts=4, top_k=2, capacity_factor=0.5}
  %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids) {num_experts=4}
  return %weights, %order, %offsets
}
"""
DISPATCH_AFTER_CAPACITY_WOULD_BE = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16]) {
  %ids_routed: i32[T, 2], %weights_routed: f32[T, 2], %order: i32[2*T], %offsets: i32[5], _, _, _, %logits: f32[T, 4] = fused_route(x=%x, w=%w_router) {num_experts=4, top_k=2}
  %ids: i32[T, 2], %weights: f32[T, 2] = apply_capacity(ids=%ids_routed, weights=%weights_routed, logits=%logits) {num_experts=4, top_k=2, capacity_factor=0.5}
  return %weights, %order, %offsets
}
"""


DISPATCH_AFTER_IDENTITY = """
graph moe(%x: f32[T, 16], %w_router: f32[6, 16]) {
  %ids: i32[T, 2], %weights: f32[T, 2] = fused_route(x=%x, w=%w_router) {num_experts=6, top_k=2}
  %ids_ffn: i32[T, 2], %identity_out: f32[T, 16] = identity_experts(x=%x, ids=%ids, weights=%weights) {ffn_experts=4}
  %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids_ffn) {num_experts=4}
  return %weights, %order, %offsets, %identity_out
}
"""
DISPATCH_AFTER_IDENTITY_WOULD_BE = """
graph moe(%x: f32[T, 16], %w_router: f32[6, 16]) {
  %ids: i32[T, 2], %weights: f32[T, 2], %order: i32[2*T], %offsets: i32[7] = fused_route(x=%x, w=%w_router) {num_experts=6, top_k=2}
  %ids_ffn: i32[T, 2], %identity_out: f32[T, 16] = identity_experts(x=%x, ids=%ids, weights=%weights) {ffn_experts=4}
  return %weights, %order, %offsets, %identity_out
}
"""


def test_fuse_dispatch_ids_guard_keeps_the_sort_after_identity_experts():
    """Guard ids from the fused_route: identity picks become dropped pairs after the kernel, so the kernel's
    order would send them to the MLP experts' GEMMs (and its offsets count the identity experts)."""
    assert_unchanged(fuse_dispatch, DISPATCH_AFTER_IDENTITY)
    assert_blocked_rewrite_is_wrong(DISPATCH_AFTER_IDENTITY, DISPATCH_AFTER_IDENTITY_WOULD_BE, {"T": 16})


def test_fuse_dispatch_ids_guard_keeps_the_sort_after_capacity():
    """Guard ids from the fused_route: capacity drops pairs after the kernel, so the kernel's order would
    keep pairs the capacity dropped."""
    assert_unchanged(fuse_dispatch, DISPATCH_AFTER_CAPACITY)
    assert_blocked_rewrite_is_wrong(DISPATCH_AFTER_CAPACITY, DISPATCH_AFTER_CAPACITY_WOULD_BE, {"T": 16})


def test_fuse_dispatch_ids_guard_keeps_given_ids():
    """Guard ids from the fused_route: ids given to the graph (the routed experts alone) have no kernel to sort in."""
    assert_unchanged(fuse_dispatch, """
        graph moe(%ids: i32[T, 2]) {
          %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids) {num_experts=4}
          return %order, %offsets
        }""")


def test_fuse_dispatch_sorted_guard_leaves_a_second_dispatch():
    """Guard: a fused_route that already yields order/offsets is not given a second pair (a second
    dispatch of the same ids stays as it is)."""
    assert_unchanged(fuse_dispatch, """
        graph moe(%x: f32[T, 16], %w_router: f32[4, 16]) {
          %ids: i32[T, 2], %weights: f32[T, 2], %order: i32[2*T], %offsets: i32[5] = fused_route(x=%x, w=%w_router) {num_experts=4, top_k=2}
          %order2: i32[2*T], %offsets2: i32[5] = dispatch(ids=%ids) {num_experts=4}
          return %order, %offsets, %order2, %offsets2
        }""")


# ==== fold-permute ===============================================================================
# Guards: (1) only grouped_gemm (2) not already gathering (gather_top_k == 0); (3) a = permute(x, order);
# (4) no other order operand on the GEMM; (5) a scaled permute only into a GEMM without a scale of its own.

PERMUTED = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w: f32[4, 8, 16]) {{
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {{num_experts=4, top_k=2}}
  %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids) {{num_experts=4}}
  %xs: f32[2*T, 16] = permute(x=%x, order=%order) {{top_k=2}}
  %h: f32[2*T, 8] = grouped_gemm({gemm}
  return %h
}}
"""
FOLDED = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w: f32[4, 8, 16]) {
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=4, top_k=2}
  %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids) {num_experts=4}
  %h: f32[2*T, 8] = grouped_gemm(a=%x, w=%w, offsets=%offsets, order=%order) {num_experts=4, gather_top_k=2}
  return %h
}
"""


def test_fold_permute_fires_on_the_base_case():
    """Positive control: a GEMM of permuted rows gathers them itself."""
    assert_rewrites_to(fold_permute, PERMUTED.format(gemm="a=%xs, w=%w, offsets=%offsets) {num_experts=4}"), FOLDED)


def test_fold_permute_gather_guard_keeps_a_gathering_gemm():
    """Guard gather_top_k == 0: a GEMM that already gathers its rows through order would lose one of the two permutations."""
    text = PERMUTED.format(gemm="a=%xs, w=%w, offsets=%offsets, order=%order) {num_experts=4, gather_top_k=1}")
    assert_unchanged(fold_permute, text)
    assert_blocked_rewrite_is_wrong(text, FOLDED, {"T": 9})


@pytest.mark.parametrize("producer", ["input", "cast"])
def test_fold_permute_producer_guard_needs_a_permute(producer):
    """Guard a = permute(x, order): rows that are not a permute of x have no token rows and order to gather from."""
    if producer == "input":
        text = """
            graph moe(%xs: f32[2*T, 16], %offsets: i32[5], %w: f32[4, 8, 16]) {
              %h: f32[2*T, 8] = grouped_gemm(a=%xs, w=%w, offsets=%offsets) {num_experts=4}
              return %h
            }"""
    else:
        text = """
            graph moe(%xs16: f16[2*T, 16], %offsets: i32[5], %w: f32[4, 8, 16]) {
              %xs: f32[2*T, 16] = cast(x=%xs16) {dtype='f32'}
              %h: f32[2*T, 8] = grouped_gemm(a=%xs, w=%w, offsets=%offsets) {num_experts=4}
              return %h
            }"""
    assert_unchanged(fold_permute, text)


def test_fold_permute_guard_gemm_with_another_order():
    """Guard: the GEMM's own order operand, when present, must be the permute's order."""
    assert_unchanged(fold_permute, """
        graph moe(%x: f32[T, 16], %order: i32[2*T], %order2: i32[2*T], %offsets: i32[5], %w: f32[4, 8, 16], %s: f32[T, 2]) {
          %xs: f32[2*T, 16] = permute(x=%x, order=%order2) {top_k=2}
          %h: f32[2*T, 8] = grouped_gemm(a=%xs, w=%w, offsets=%offsets, order=%order, scale=%s) {num_experts=4}
          return %h
        }""")


SCALED_PERMUTE = """
graph moe(%x: f32[T, 16], %order: i32[2*T], %offsets: i32[5], %w: f32[4, 8, 16], %s: f32[T, 2], %s2: f32[T, 2]) {{
  %xs: f32[2*T, 16] = permute(x=%x, order=%order, scale=%s) {{top_k=2}}
  %h: f32[2*T, 8] = grouped_gemm({gemm}
  return %h
}}
"""


def test_fold_permute_carries_the_permutes_scale_into_the_gemm():
    """Positive control: rows the routing weights scale (Llama4) become the GEMM's scale on its accumulators."""
    assert_rewrites_to(fold_permute, SCALED_PERMUTE.format(gemm="a=%xs, w=%w, offsets=%offsets) {num_experts=4}"), """
        graph moe(%x: f32[T, 16], %order: i32[2*T], %offsets: i32[5], %w: f32[4, 8, 16], %s: f32[T, 2], %s2: f32[T, 2]) {
          %h: f32[2*T, 8] = grouped_gemm(a=%x, w=%w, offsets=%offsets, order=%order, scale=%s) {num_experts=4, gather_top_k=2, scale_in=True}
          return %h
        }""")


def test_fold_permute_guard_scaled_rows_into_a_gemm_with_its_own_scale():
    """Guard: a scaled permute folds only into a GEMM without a scale (one scale per kernel: the output's would be lost)."""
    text = SCALED_PERMUTE.format(gemm="a=%xs, w=%w, offsets=%offsets, order=%order, scale=%s2) {num_experts=4}")
    assert_unchanged(fold_permute, text)


# ==== fuse-activation ============================================================================
# Guards: gate (1) and up (2) are grouped_gemm with one use; gate (3) and up (4) are plain: no activation
# (so no w_up), no scale (but the rows' scale_in), not scatter; (5) same rows: a, offsets, order, scale; (6) same
# attributes.

DENSE_GLU = """
graph moe(%x: f32[T, 16], %w_gate: f32[1, 8, 16], %w_up: f32[1, 8, 16]{extra}) {{
  %gate: f32[T, 8] = grouped_gemm({gate}
  %up: f32[T, 8] = grouped_gemm({up}
  %h: f32[T, 8] = activate(gate=%gate, up=%up) {{activation='silu', glu=True}}
  return %h{ret}
}}
"""
PLAIN_GATE = "a=%x, w=%w_gate) {num_experts=1}"
PLAIN_UP = "a=%x, w=%w_up) {num_experts=1}"


def dense_glu(gate=PLAIN_GATE, up=PLAIN_UP, extra="", ret=""):
    return DENSE_GLU.format(gate=gate, up=up, extra=extra, ret=ret)


def test_fuse_activation_fires_on_the_base_case():
    """Positive control: plain gate and up GEMMs over the same rows become one GEMM with a SwiGLU epilogue."""
    assert_rewrites_to(fuse_activation, dense_glu(), """
        graph moe(%x: f32[T, 16], %w_gate: f32[1, 8, 16], %w_up: f32[1, 8, 16]) {
          %h: f32[T, 8] = grouped_gemm(a=%x, w=%w_gate, w_up=%w_up) {num_experts=1, activation='silu', glu=True}
          return %h
        }""")


def test_fuse_activation_fuses_gemms_of_the_same_scaled_rows():
    """Positive control: gate and up of rows the routing weights scale (scale_in, the same scale) fuse; the
    scale stays on the fused GEMM's accumulators."""
    scaled = "a=%x, w={w}, offsets=%offsets, order=%order, scale=%s) {{num_experts=4, gather_top_k=2, scale_in=True}}"
    text = """
        graph moe(%x: f32[T, 16], %order: i32[2*T], %offsets: i32[5], %w_gate: f32[4, 8, 16], %w_up: f32[4, 8, 16], %s: f32[T, 2], %s2: f32[T, 2]) {{
          %gate: f32[2*T, 8] = grouped_gemm({gate}
          %up: f32[2*T, 8] = grouped_gemm({up}
          %h: f32[2*T, 8] = activate(gate=%gate, up=%up) {{activation='silu', glu=True}}
          return %h
        }}"""
    assert_rewrites_to(fuse_activation, text.format(gate=scaled.format(w="%w_gate"), up=scaled.format(w="%w_up")), """
        graph moe(%x: f32[T, 16], %order: i32[2*T], %offsets: i32[5], %w_gate: f32[4, 8, 16], %w_up: f32[4, 8, 16], %s: f32[T, 2], %s2: f32[T, 2]) {
          %h: f32[2*T, 8] = grouped_gemm(a=%x, w=%w_gate, offsets=%offsets, w_up=%w_up, order=%order, scale=%s) {num_experts=4, activation='silu', glu=True, gather_top_k=2, scale_in=True}
          return %h
        }""")
    other = scaled.format(w="%w_up").replace("scale=%s)", "scale=%s2)")
    assert_unchanged(fuse_activation, text.format(gate=scaled.format(w="%w_gate"), up=other))    # guard: same scale


def test_fuse_activation_gate_single_use_guard():
    """Guard gate has one use: the gate projection is read elsewhere too, so it must still reach memory."""
    assert_unchanged(fuse_activation, dense_glu(ret=", %gate"))


def test_fuse_activation_up_single_use_guard():
    """Guard up has one use: the up projection is read elsewhere too, so it must still reach memory."""
    assert_unchanged(fuse_activation, dense_glu(ret=", %up"))


@pytest.mark.parametrize("producer", ["input", "cast"])
def test_fuse_activation_gate_is_grouped_gemm_guard(producer):
    """Guard gate = grouped_gemm: a gate that is not a GEMM has no weights to fuse."""
    if producer == "input":
        text = """
            graph moe(%x: f32[T, 16], %gate: f32[T, 8], %w_up: f32[1, 8, 16]) {
              %up: f32[T, 8] = grouped_gemm(a=%x, w=%w_up) {num_experts=1}
              %h: f32[T, 8] = activate(gate=%gate, up=%up) {activation='silu', glu=True}
              return %h
            }"""
    else:
        text = """
            graph moe(%x: f32[T, 16], %gate16: f16[T, 8], %w_up: f32[1, 8, 16]) {
              %gate: f32[T, 8] = cast(x=%gate16) {dtype='f32'}
              %up: f32[T, 8] = grouped_gemm(a=%x, w=%w_up) {num_experts=1}
              %h: f32[T, 8] = activate(gate=%gate, up=%up) {activation='silu', glu=True}
              return %h
            }"""
    assert_unchanged(fuse_activation, text)


def test_fuse_activation_up_is_grouped_gemm_guard():
    """Guard up = grouped_gemm: an up operand that is not a GEMM has no weights to fuse."""
    assert_unchanged(fuse_activation, """
        graph moe(%x: f32[T, 16], %w_gate: f32[1, 8, 16], %up: f32[T, 8]) {
          %gate: f32[T, 8] = grouped_gemm(a=%x, w=%w_gate) {num_experts=1}
          %h: f32[T, 8] = activate(gate=%gate, up=%up) {activation='silu', glu=True}
          return %h
        }""")


@pytest.mark.parametrize("glu", [True, False])
def test_fuse_activation_gate_plain_activation_guard(glu):
    """Guard gate has no activation: the epilogue would apply silu to the raw product and lose the gate's own relu."""
    # with glu, gate and up both have the activation (else the same-attrs guard alone would decline)
    if glu:
        text = dense_glu(gate="a=%x, w=%w_gate) {num_experts=1, activation='relu'}",
                         up="a=%x, w=%w_up) {num_experts=1, activation='relu'}")
    else:
        text = """
            graph moe(%x: f32[T, 16], %w_gate: f32[1, 8, 16]) {
              %gate: f32[T, 8] = grouped_gemm(a=%x, w=%w_gate) {num_experts=1, activation='relu'}
              %h: f32[T, 8] = activate(gate=%gate) {activation='silu'}
              return %h
            }"""
    assert_unchanged(fuse_activation, text)


def test_fuse_activation_gate_that_is_a_fused_glu():
    """A gate that is itself a fused GLU GEMM cannot take a second up projection (its activation
    rules it out: the verifier admits w_up only with glu and an activation)."""
    assert_unchanged(fuse_activation, dense_glu(gate="a=%x, w=%w_gate, w_up=%w_g2) {num_experts=1, activation='silu', glu=True}",
                                                extra=", %w_g2: f32[1, 8, 16]"))


def test_fuse_activation_gate_plain_scale_guard():
    """Guard gate has no scale: act(s * G) * U is not the fused kernel's act(G) * U (it would drop or misplace s)."""
    assert_unchanged(fuse_activation, dense_glu(gate="a=%x, w=%w_gate, scale=%s) {num_experts=1}", extra=", %s: f32[T]"))


def test_fuse_activation_gate_plain_scatter_guard():
    """Guard gate is not scatter: the GLU epilogue is only fused into GEMMs that store rows in place."""
    # conservative, not needed for soundness: the interpreter gives the same result for the fused scattered GLU
    # (the activation is row-wise, so it commutes with the row scatter)
    assert_unchanged(fuse_activation, dense_glu(gate="a=%x, w=%w_gate, order=%order) {num_experts=1, scatter=True}",
                                                up="a=%x, w=%w_up, order=%order) {num_experts=1, scatter=True}",
                                                extra=", %order: i32[T]"))


def test_fuse_activation_up_plain_guard():
    """Guard up is plain: an up projection with its own row scale would lose it in the fused epilogue."""
    # (an up with its own activation or scatter differs from a plain gate in attributes: the same-attrs guard)
    assert_unchanged(fuse_activation, dense_glu(up="a=%x, w=%w_up, scale=%s) {num_experts=1}", extra=", %s: f32[T]"))


SAME_A = dense_glu(up="a=%x2, w=%w_up) {num_experts=1}", extra=", %x2: f32[T, 16]")
SAME_A_WOULD_BE = """
graph moe(%x: f32[T, 16], %w_gate: f32[1, 8, 16], %w_up: f32[1, 8, 16], %x2: f32[T, 16]) {
  %h: f32[T, 8] = grouped_gemm(a=%x, w=%w_gate, w_up=%w_up) {num_experts=1, activation='silu', glu=True}
  return %h
}
"""


def test_fuse_activation_same_rows_guard_a():
    """Guard gate.a == up.a: one K loop over one A tile cannot compute products of two different inputs."""
    assert_unchanged(fuse_activation, SAME_A)
    assert_blocked_rewrite_is_wrong(SAME_A, SAME_A_WOULD_BE, {"T": 9})


ROUTED_GLU = """
graph moe(%x: f32[T, 16], %order: i32[2*T], %order2: i32[2*T], %offsets: i32[5], %offsets2: i32[5], %w_gate: f32[4, 8, 16], %w_up: f32[4, 8, 16]) {{
  %gate: f32[2*T, 8] = grouped_gemm(a=%x, w=%w_gate, offsets=%offsets, order=%order) {{num_experts=4, gather_top_k=2}}
  %up: f32[2*T, 8] = grouped_gemm(a=%x, w=%w_up, offsets=%{offsets}, order=%{order}) {{num_experts=4, gather_top_k=2}}
  %h: f32[2*T, 8] = activate(gate=%gate, up=%up) {{activation='silu', glu=True}}
  return %h
}}
"""


def test_fuse_activation_same_rows_guard_offsets():
    """Guard gate.offsets == up.offsets: the fused GEMM would apply the gate's expert ranges to the up projection."""
    assert_unchanged(fuse_activation, ROUTED_GLU.format(offsets="offsets2", order="order"))


def test_fuse_activation_same_rows_guard_order():
    """Guard gate.order == up.order: the fused GEMM would gather the up projection's rows in the gate's order."""
    assert_unchanged(fuse_activation, ROUTED_GLU.format(offsets="offsets", order="order2"))


SAME_ATTRS = dense_glu(gate="a=%x, w=%w_gate, order=%order) {num_experts=1}",
                       up="a=%x, w=%w_up, order=%order) {num_experts=1, gather_top_k=1}", extra=", %order: i32[T]")
SAME_ATTRS_WOULD_BE = """
graph moe(%x: f32[T, 16], %w_gate: f32[1, 8, 16], %w_up: f32[1, 8, 16], %order: i32[T]) {
  %h: f32[T, 8] = grouped_gemm(a=%x, w=%w_gate, w_up=%w_up, order=%order) {num_experts=1, activation='silu', glu=True}
  return %h
}
"""


def test_fuse_activation_same_attrs_guard():
    """Guard gate.attr == up.attr: same operands read differently (up gathers x[order[i]]) are not the same rows."""
    assert_unchanged(fuse_activation, SAME_ATTRS)
    assert_blocked_rewrite_is_wrong(SAME_ATTRS, SAME_ATTRS_WOULD_BE, {"T": 9})


# ==== fold-combine ===============================================================================
# Guards: (1) y = grouped_gemm with one use; (2) not already scatter; (3) no scale; (4) no other order;
# absorbing: an add only
# when combine's result has one use (5) and that use is an add; (6) a cast only when its operand has one use
# (7) and that use is a cast.

COMBINE = """
graph moe(%h: f32[2*T, 8], %order: i32[2*T], %offsets: i32[5], %weights: f32[T, 2], %ids: i32[T, 2], %w_down: f32[4, 16, 8], %shared: f32[T, 16]) {{
  %ys: f32[2*T, 16] = grouped_gemm({gemm}
  %routed: f32[T, 16] = combine(y=%ys, order=%order, ids=%ids, weights=%weights) {{top_k=2}}
{tail}
}}
"""
PLAIN_DOWN = "a=%h, w=%w_down, offsets=%offsets) {num_experts=4}"
HEAD = ("graph moe(%h: f32[2*T, 8], %order: i32[2*T], %offsets: i32[5], %weights: f32[T, 2], %ids: i32[T, 2], "
        "%w_down: f32[4, 16, 8], %shared: f32[T, 16]) {\n")
SCATTERED = ("  %pairs_out: f32[2*T, 16] = grouped_gemm(a=%h, w=%w_down, offsets=%offsets, order=%order, scale=%weights) "
             "{num_experts=4, scatter=True, out_dtype='f32'}\n")


def combine(gemm=PLAIN_DOWN, tail="  return %routed"):
    return COMBINE.format(gemm=gemm, tail=tail)


def test_fold_combine_fires_on_the_base_case():
    """Positive control: the weights and un-permute move into the down GEMM, the add and cast into reduce_topk."""
    tail = "  %y: f32[T, 16] = add(a=%routed, b=%shared)\n  %z: f16[T, 16] = cast(x=%y) {dtype='f16'}\n  return %z"
    assert_rewrites_to(fold_combine, combine(tail=tail), HEAD + SCATTERED +
                       "  %z: f16[T, 16] = reduce_topk(y=%pairs_out, ids=%ids, residual=%shared) {top_k=2, out_dtype='f16'}\n"
                       "  return %z\n}")


def test_fold_combine_single_use_guard():
    """Guard y has one use: scattering the GEMM's rows would change what the other reader of y sees."""
    assert_unchanged(fold_combine, combine(tail="  return %routed, %ys"))


@pytest.mark.parametrize("producer", ["input", "cast"])
def test_fold_combine_grouped_gemm_guard(producer):
    """Guard y = grouped_gemm: without a producing GEMM there is no epilogue to fold the weights into."""
    if producer == "input":
        text = """
            graph moe(%ys: f32[2*T, 16], %order: i32[2*T], %weights: f32[T, 2], %ids: i32[T, 2]) {
              %routed: f32[T, 16] = combine(y=%ys, order=%order, ids=%ids, weights=%weights) {top_k=2}
              return %routed
            }"""
    else:
        text = """
            graph moe(%ys16: f16[2*T, 16], %order: i32[2*T], %weights: f32[T, 2], %ids: i32[T, 2]) {
              %ys: f32[2*T, 16] = cast(x=%ys16) {dtype='f32'}
              %routed: f32[T, 16] = combine(y=%ys, order=%order, ids=%ids, weights=%weights) {top_k=2}
              return %routed
            }"""
    assert_unchanged(fold_combine, text)


NORMED = """
graph moe(%h: f32[2*T, 8], %order: i32[2*T], %offsets: i32[5], %weights: f32[T, 2], %ids: i32[T, 2], %w_down: f32[4, 16, 8], %w_norm: f32[4, 16]) {{
  %ys: f32[2*T, 16] = grouped_gemm(a=%h, w=%w_down, offsets=%offsets) {{num_experts=4}}
  %ys_normed: f32[2*T, 16] = expert_norm(y=%ys, w=%w_norm, offsets=%offsets) {{eps=1e-06}}
  %routed: f32[T, 16] = combine(y=%ys_normed, order=%order, ids=%ids, weights=%weights) {{top_k=2}}
  return %routed{more}
}}
"""


def test_fold_combine_folds_into_expert_norms():
    """Expert norms between the down GEMM and the combine: the weights and un-permute go into the norm's kernel
    (it normalises whole rows before the weights apply), the GEMM keeps its plain store."""
    assert_rewrites_to(fold_combine, NORMED.format(more=""), """
        graph moe(%h: f32[2*T, 8], %order: i32[2*T], %offsets: i32[5], %weights: f32[T, 2], %ids: i32[T, 2], %w_down: f32[4, 16, 8], %w_norm: f32[4, 16]) {
          %ys: f32[2*T, 16] = grouped_gemm(a=%h, w=%w_down, offsets=%offsets) {num_experts=4}
          %pairs_out: f32[2*T, 16] = expert_norm(y=%ys, w=%w_norm, offsets=%offsets, order=%order, weights=%weights) {eps=1e-06, scatter=True}
          %routed: f32[T, 16] = reduce_topk(y=%pairs_out, ids=%ids) {top_k=2, out_dtype='f32'}
          return %routed
        }""")


def test_fold_combine_expert_norm_single_use_guard():
    """Guard: normalised rows another node reads stay in expert order (must not fire)."""
    assert_unchanged(fold_combine, NORMED.format(more=", %ys_normed"))


def test_fold_combine_scatter_guard():
    """Guard not scatter: the GEMM already stores pair-major rows; the combine's un-permute on top would be lost."""
    assert_unchanged(fold_combine, combine(gemm="a=%h, w=%w_down, offsets=%offsets, order=%order) {num_experts=4, scatter=True}"))


ROUTED_SCALED = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_down: f32[4, 16, 16], %s: f32[T, 2]) {
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=4, top_k=2}
  %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids) {num_experts=4}
  %ys: f32[2*T, 16] = grouped_gemm(a=%x, w=%w_down, offsets=%offsets, order=%order, scale=%s) {num_experts=4, gather_top_k=2}
  %routed: f32[T, 16] = combine(y=%ys, order=%order, ids=%ids, weights=%weights) {top_k=2}
  return %routed
}
"""
ROUTED_SCALED_WOULD_BE = """
graph moe(%x: f32[T, 16], %w_router: f32[4, 16], %w_down: f32[4, 16, 16], %s: f32[T, 2]) {
  %logits: f32[T, 4] = linear(x=%x, w=%w_router)
  %ids: i32[T, 2], %weights: f32[T, 2] = route(logits=%logits) {num_experts=4, top_k=2}
  %order: i32[2*T], %offsets: i32[5] = dispatch(ids=%ids) {num_experts=4}
  %pairs_out: f32[2*T, 16] = grouped_gemm(a=%x, w=%w_down, offsets=%offsets, order=%order, scale=%weights) {num_experts=4, gather_top_k=2, scatter=True, out_dtype='f32'}
  %routed: f32[T, 16] = reduce_topk(y=%pairs_out, ids=%ids) {top_k=2, out_dtype='f32'}
  return %routed
}
"""


def test_fold_combine_scale_guard():
    """Guard no scale: the GEMM has one scale operand; the routing weights would replace the GEMM's own scale."""
    assert_unchanged(fold_combine, ROUTED_SCALED)
    assert_blocked_rewrite_is_wrong(ROUTED_SCALED, ROUTED_SCALED_WOULD_BE, {"T": 9})


def test_fold_combine_add_single_use_guard():
    """Guard combine's result has one use before absorbing the add: the routed sum is read elsewhere, so it must stay."""
    tail = "  %y: f32[T, 16] = add(a=%routed, b=%shared)\n  return %y, %routed"
    assert_rewrites_to(fold_combine, combine(tail=tail), HEAD + SCATTERED +
                       "  %routed: f32[T, 16] = reduce_topk(y=%pairs_out, ids=%ids) {top_k=2, out_dtype='f32'}\n" + tail + "\n}")


def test_fold_combine_add_or_cast_guard():
    """Guard the single use is an add (or a cast): any other reader (a linear) is not a residual to absorb."""
    tail = "  %y: f32[T, 4] = linear(x=%routed, w=%w_out)\n  return %y"
    text = combine(tail=tail).replace("%shared: f32[T, 16]", "%w_out: f32[4, 16]")
    assert_rewrites_to(fold_combine, text, HEAD.replace("%shared: f32[T, 16]", "%w_out: f32[4, 16]") + SCATTERED +
                       "  %routed: f32[T, 16] = reduce_topk(y=%pairs_out, ids=%ids) {top_k=2, out_dtype='f32'}\n" + tail + "\n}")


def test_fold_combine_cast_single_use_guard():
    """Guard the value before the cast has one use: the fp32 sum is read elsewhere, so the cast cannot be absorbed."""
    for tail in ("  %y: f16[T, 16] = cast(x=%routed) {dtype='f16'}\n  return %y, %routed",
                 "  %y: f32[T, 16] = add(a=%routed, b=%shared)\n  %z: f16[T, 16] = cast(x=%y) {dtype='f16'}\n  return %z, %y"):
        out = verify(fold_combine(ir(combine(tail=tail)), CTX))
        assert [n.op for n in out.nodes][-1] == "cast" and sum(n.op == "reduce_topk" for n in out.nodes) == 1


def test_fold_combine_guard_add_of_the_routed_sum_to_itself():
    """Guard: an add reading the routed sum twice is not (routed + residual)."""
    g = ir(combine(tail="  %y: f32[T, 16] = add(a=%routed, b=%routed)\n  return %y"))
    verify(fold_combine(g, CTX))


def test_fold_combine_guard_gemm_gathering_with_another_order():
    """Guard: the GEMM's own order operand, when present, must be the combine's order."""
    assert_unchanged(fold_combine, """
        graph moe(%x: f32[T, 16], %order: i32[2*T], %order2: i32[2*T], %offsets: i32[5], %w: f32[4, 16, 16], %weights: f32[T, 2], %ids: i32[T, 2]) {
          %ys: f32[2*T, 16] = grouped_gemm(a=%x, w=%w, offsets=%offsets, order=%order2) {num_experts=4, gather_top_k=2}
          %routed: f32[T, 16] = combine(y=%ys, order=%order, ids=%ids, weights=%weights) {top_k=2}
          return %routed
        }""")


# ==== save-activations ===========================================================================
# Guards: (1) a forward a backward follows (ctx.saving set); (2) the policy chooses saving; (3) a GEMM with an
# activation in its epilogue (4) not already storing pre and (5) not scattering (its rows would be pair order);
# (6) its rows not scaled by the routing weights (scale_in, or a scaled permute's rows).

FUSED_GLU = """
graph moe(%x: f32[T, 16], %w_gate: f32[1, 8, 16], %w_up: f32[1, 8, 16]) {{
  %h: f32[T, 8]{pre} = grouped_gemm(a=%x, w=%w_gate, w_up=%w_up) {{num_experts=1, activation='silu', glu=True}}
  return %h
}}
"""
SAVING = PassContext(ARCHS["sm90"], saving="save")


def test_save_activations_fires_on_the_base_case():
    """Positive control: a training forward with saving chosen stores the activation's inputs."""
    out = verify(save_activations(ir(FUSED_GLU.format(pre="")), SAVING))
    assert print_graph(out) == textwrap.dedent(FUSED_GLU.format(
        pre=", %h_pre: f32[T, 8], %h_pre_up: f32[T, 8]")).strip() + "\n"


@pytest.mark.parametrize("ctx", [CTX, PassContext(ARCHS["sm90"], saving="recompute"),
                                 PassContext(ARCHS["sm90"], saving="auto")], ids=["inference", "recompute", "auto"])
def test_save_activations_policy_guard(ctx):
    """Guards 1-2: an inference forward, ``recompute``, and ``auto`` at d=16 (moving the products costs more than
    recomputing them) keep the graph."""
    g = ir(FUSED_GLU.format(pre=""))
    assert print_graph(save_activations(g, ctx)) == print_graph(g)


def test_save_activations_activation_guard_leaves_plain_gemms():
    g = ir("""
        graph moe(%x: f32[T, 16], %w: f32[1, 8, 16]) {
          %h: f32[T, 8] = grouped_gemm(a=%x, w=%w) {num_experts=1}
          return %h
        }""")
    assert print_graph(save_activations(g, SAVING)) == print_graph(g)


def test_save_activations_stored_guard_is_idempotent():
    g = ir(FUSED_GLU.format(pre=", %h_pre: f32[T, 8], %h_pre_up: f32[T, 8]"))
    assert print_graph(save_activations(g, SAVING)) == print_graph(g)


def test_save_activations_scatter_guard():
    g = ir("""
        graph moe(%x: f32[T, 16], %w: f32[4, 8, 16], %offsets: i32[5], %order: i32[2*T]) {
          %h: f32[2*T, 8] = grouped_gemm(a=%x, w=%w, offsets=%offsets, order=%order) {num_experts=4, activation='relu', gather_top_k=2, scatter=True}
          return %h
        }""")
    assert print_graph(save_activations(g, SAVING)) == print_graph(g)



@pytest.mark.parametrize("rows", ["scale_in", "permute"])
def test_save_activations_scaled_rows_guard(rows):
    """Guard 6: the products of rows the routing weights scale are s * gate, not what the backward reads (the
    unscaled gate and up): recomputed, never saved, whether the scale is folded into the GEMM or not."""
    if rows == "scale_in":
        body = """%h: f32[2*T, 8] = grouped_gemm(a=%x, w=%w, offsets=%offsets, w_up=%w, order=%order, scale=%s) {num_experts=4, activation='silu', glu=True, gather_top_k=2, scale_in=True}"""
    else:
        body = """%xs: f32[2*T, 16] = permute(x=%x, order=%order, scale=%s) {top_k=2}
          %h: f32[2*T, 8] = grouped_gemm(a=%xs, w=%w, offsets=%offsets, w_up=%w) {num_experts=4, activation='silu', glu=True}"""
    g = ir(f"""
        graph moe(%x: f32[T, 16], %w: f32[4, 8, 16], %offsets: i32[5], %order: i32[2*T], %s: f32[T, 2]) {{
          {body}
          return %h
        }}""")
    assert print_graph(save_activations(g, SAVING)) == print_graph(g)


# ==== fuse-block-gate ============================================================================
# Guards: (1) pooled = block_pool(k); (2) the pool's block_size is the gate's; (3) so are its packed sequences.

BLOCK_GATE = """
graph moba(%q: f32[B, 2, T, 8], %k: f32[B, 2, T, 8]) {{
  %pooled: f32[B, 2, ceiling(T/{pbs}), 8] = block_pool(k=%k) {{block_size={pbs}}}
  %indices: i32[B, 2, T, 3] = block_gate(q=%q, pooled=%pooled) {{block_size={gbs}, top_k=3}}
  return %indices
}}
"""
FUSED_GATE = """
graph moba(%q: f32[B, 2, T, 8], %k: f32[B, 2, T, 8]) {{
  %indices: i32[B, 2, T, 3] = fused_block_gate(q=%q, k=%k) {{block_size={gbs}, top_k=3}}
  return %indices
}}
"""


def test_fuse_block_gate_fires_on_the_base_case():
    """Positive control: a gate over its own block size's pooled keys becomes one fused_block_gate."""
    assert_rewrites_to(fuse_block_gate, BLOCK_GATE.format(pbs=16, gbs=16), FUSED_GATE.format(gbs=16))


@pytest.mark.parametrize("producer", ["input", "cast"])
def test_fuse_block_gate_pool_guard(producer):
    """Guard pooled = block_pool(k): representatives that are not pooled keys cannot be recomputed from k in the kernel."""
    if producer == "input":
        text = """
            graph moba(%q: f32[B, 2, T, 8], %pooled: f32[B, 2, ceiling(T/16), 8]) {
              %indices: i32[B, 2, T, 3] = block_gate(q=%q, pooled=%pooled) {block_size=16, top_k=3}
              return %indices
            }"""
    else:
        text = """
            graph moba(%q: f32[B, 2, T, 8], %pooled16: f16[B, 2, ceiling(T/16), 8]) {
              %pooled: f32[B, 2, ceiling(T/16), 8] = cast(x=%pooled16) {dtype='f32'}
              %indices: i32[B, 2, T, 3] = block_gate(q=%q, pooled=%pooled) {block_size=16, top_k=3}
              return %indices
            }"""
    assert_unchanged(fuse_block_gate, text)


def test_fuse_block_gate_block_size_guard():
    """Guard pool.block_size == gate.block_size: the fused kernel pools by the gate's block size, not the pool's."""
    text = BLOCK_GATE.format(pbs=16, gbs=32)
    assert_unchanged(fuse_block_gate, text)
    assert_blocked_rewrite_is_wrong(text, FUSED_GATE.format(gbs=32), {"B": 1, "T": 100})


PACKED_POOL = """
graph moba(%q: f32[B, 2, T, 8], %k: f32[B, 2, T, 8], %cu_seqlens: i32[S + 1]) {
  %pooled: f32[B, 2, S + ceiling(T/16), 8] = block_pool(k=%k, cu_seqlens=%cu_seqlens) {block_size=16}
  %indices: i32[B, 2, T, 3] = block_gate(q=%q, pooled=%pooled) {block_size=16, top_k=3}
  return %indices
}
"""
PACKED_POOL_WOULD_BE = """
graph moba(%q: f32[B, 2, T, 8], %k: f32[B, 2, T, 8], %cu_seqlens: i32[S + 1]) {
  %indices: i32[B, 2, T, 3] = fused_block_gate(q=%q, k=%k) {block_size=16, top_k=3}
  return %indices
}
"""


def test_fuse_block_gate_cu_seqlens_guard():
    """Guard pool.cu_seqlens == gate.cu_seqlens: pooled rows packed per sequence are not the gate's unpacked blocks."""
    assert_unchanged(fuse_block_gate, PACKED_POOL)
    assert_blocked_rewrite_is_wrong(PACKED_POOL, PACKED_POOL_WOULD_BE, {"B": 1, "T": 70, "S": 2},
                                    given={"cu_seqlens": torch.tensor([0, 37, 70], dtype=torch.int32)})


# ==== choose-moba-scheme =========================================================================
# Guards: (1) only block_sparse_attention; (2) 'auto' (3) with top_k <= 1 is rows only.

ATTENTION = """
graph moba(%q: f32[B, 2, T, 8], %k: f32[B, 2, T, 8], %v: f32[B, 2, T, 8], %indices: i32[B, 2, T, {K}]) {{
  %out: f32[B, 2, T, 8] = block_sparse_attention(q=%q, k=%k, v=%v, indices=%indices) {{block_size=16{scheme}}}
  return %out
}}
"""


def test_choose_moba_scheme_fires_on_the_base_case():
    """Positive control: an 'auto' attention with top_k > 1 gets both schemes and a select."""
    out = verify(choose_moba_scheme(ir(ATTENTION.format(K=3, scheme="")), CTX))
    assert [n.op for n in out.nodes] == ["block_sparse_attention", "block_sparse_attention", "select"]
    assert [n.attr["scheme"] for n in out.nodes[:2]] == ["rows", "densify"]


@pytest.mark.parametrize("scheme", ["rows", "densify"])
def test_choose_moba_scheme_keeps_a_settled_scheme(scheme):
    """An attention already settled on a scheme stays exactly as it is."""
    assert_unchanged(choose_moba_scheme, ATTENTION.format(K=3, scheme=f", scheme='{scheme}'"))


def test_choose_moba_scheme_top_k_guard_auto_top1_is_rows_only():
    """Guard top_k <= 1 under 'auto': one block (the own block) has no union to waste work on; no densify, no select."""
    assert_rewrites_to(choose_moba_scheme, ATTENTION.format(K=1, scheme=""), ATTENTION.format(K=1, scheme=", scheme='rows'"))


def test_choose_moba_scheme_auto_guard_keeps_explicit_densify():
    """Guard scheme == 'auto' for the top_k <= 1 shortcut: an explicit 'densify' is honoured even at top_k = 1."""
    assert_unchanged(choose_moba_scheme, ATTENTION.format(K=1, scheme=", scheme='densify'"))


# ==== passes without guards: verify, infer-shapes, choose-tiles; idempotence of every pass ======

GOLDENS = sorted(p for p in GOLDEN.glob("*.ir"))


def _pass_of(path: Path):
    case, _, stage = path.name[:-len(".ir")].split(".")
    kind = "moba" if case.startswith("moba") else "moe"
    return {p.name: p.fn for p in PIPELINES[kind]}.get(stage), kind


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_verify_is_the_identity(path):
    """verify returns the very graph it was given, at every stage."""
    g = parse_graph(path.read_text())
    assert PIPELINES["moe"][0].fn(g, CTX) is g


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_infer_shapes_is_the_identity_on_inferred_graphs(path):
    """infer-shapes on a graph whose types are already inferred (every golden stage, fused or not) changes nothing."""
    g = parse_graph(path.read_text())
    assert print_graph(verify(infer_shapes(g, CTX))) == path.read_text()


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: p.stem)
def test_every_pass_is_idempotent_on_its_golden(path):
    """A pass run again on its own output has nothing left to rewrite."""
    fn, _ = _pass_of(path)
    if fn is None:
        pytest.skip("captured graph: no pass made it")
    assert print_graph(verify(fn(parse_graph(path.read_text()), CTX))) == path.read_text()


def _strip_tiles(n):
    """The node without its tile attributes (as a comparable tuple: attribute order aside)."""
    attrs = {k: v for k, v in n.attrs if k not in ("tiles", *PROVENANCE_ATTRS)}
    return n.op, n.operands, n.results, n.types, sorted(attrs.items(), key=lambda kv: kv[0])


@pytest.mark.parametrize("arch", ["sm90", "cpu"])
@pytest.mark.parametrize("path", [p for p in GOLDENS if ".00.captured" in p.name or "choose-tiles" in p.name],
                         ids=lambda p: p.stem)
def test_choose_tiles_touches_only_kernel_tiles(path, arch):
    """choose-tiles leaves non-kernel nodes, values, types and order alone and changes only kernel nodes' tile attributes."""
    g = verify(parse_graph(path.read_text()))
    if ".00.captured" not in path.name:          # drop the golden's tiles first, then choose them again
        g = g.with_nodes([n.replace(attrs={"tiles": None, "tile_source": None}) if is_kernel(n.op) else n
                          for n in g.nodes])
    out = verify(choose_tiles(g, PassContext(ARCHS[arch])))
    assert (out.name, out.inputs, out.outputs, len(out.nodes)) == (g.name, g.inputs, g.outputs, len(g.nodes))
    for a, b in zip(g.nodes, out.nodes):
        if is_kernel(a.op):
            assert b.attr["tiles"] and _strip_tiles(b) == _strip_tiles(a)
        else:
            assert b == a
