"""CUDA-graph safety of a compiled MoE call, proven on the CPU.

A CUDA graph replays the kernels and allocations it recorded: a call can be captured only if it
never waits for the device from the host (``.item()``, ``bool(t)``, ``nonzero``, a boolean-mask
index, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``, ``.tolist()``...)
and if what it allocates and launches depends on the token count alone, never on the routing.

`Watch` records every aten op a call makes outside the kernel launches (a `TorchDispatchMode`;
`moec.runtime.launch.in_launch` tells when the Triton interpreter's own tensor traffic starts)
with its arguments' and results' shapes, dtypes and strides, plus every launch's kernel, grid,
scalar arguments and constexprs (`launch.recording`). Python-level host reads that never reach
the dispatcher on a CPU (``tolist``, ``numpy``, ``__array__``) are watched by patching them.

For compiled zoo layers (`moec.compile(..., arch="sm90")`: the GPU tile table, so each bucket's
kernel is the one a GPU would run, interpreted here) and for ``moec.ops.moe``, at T = 1, 7, 16
(the decode bucket) under routings that send every token to the same experts, spread tokens
over all experts, tie every expert (zero input) and route at random, and at T = 1025 (Mixtral's
largest bucket; ``moec.ops.moe`` at T = 300, its one CPU bucket at a larger grid) under the two
extremes, the test asserts:

(a) no host-synchronising op or host read is made;
(b) the op trace (every op with its shapes) and the launch trace (grids, scalar arguments) are
    identical across the routings at the same T: nothing is sized from routing data;
(c) grids and scalar kernel arguments are host Python numbers (never a tensor read on the host).

Expert capacity runs on the device (`moec.runtime.capacity`): under graph capture it takes its
fixed schedule, checked here with `capacity.capturing` patched to True; outside capture it may
stop early (one host read per round), which the test also shows. A router no pass fuses (noisy
gating with capacity) runs the reference's torch code: `Program.graph_safe` is False there,
`explain()` says so, and `Watch` catches its synchronisations (a positive control, as is the
eager reference whose op trace depends on the routing).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moec
import zoo
from moec import reference as ref
from moec.compiler import compile_spec
from moec.ops import _moe_op
from moec.ir.build import moe_inputs
from moec.runtime import capacity, launch
from moec.runtime.arch import ARCHS
from moec.spec import MoESpec, MoEWeights, RouterConfig

# the interpreter evaluates in numpy: exp overflow warnings are expected there
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SMALL_T = (1, 7, 16)            # the decode bucket (T <= 16)
LARGE_T = 1025                  # the first T of the largest bucket (T > 1024)
ROUTINGS = ("one", "spread", "ties", "random")

# ops that make the host wait for the device, or whose result size depends on tensor values
HOST_SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::allclose",
             "aten::nonzero", "aten::nonzero_numpy", "aten::argwhere", "aten::masked_select",
             "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
             "aten::unique_dim_consecutive", "aten::bincount", "aten::histogram", "aten::tolist"}
MASK_INDEXED = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def sync_reason(func, args, kwargs):
    """Why ``func(*args, **kwargs)`` synchronises with the host (None: it does not)."""
    name = func._schema.name
    if name in HOST_SYNC:
        return name
    if name in MASK_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(_is_mask(i) for i in indices or ()):
            return f"{name} with a boolean mask"
    if name == "aten::repeat_interleave" and isinstance(args[0] if args else None, torch.Tensor):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0])
        if (isinstance(repeats, torch.Tensor) or len(args) == 1) and kwargs.get("output_size") is None:
            return "aten::repeat_interleave of a tensor of repeats without output_size"
    if name in ("aten::_to_copy", "aten::copy_", "aten::to"):
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cpu" and any(t.device.type != "cpu" for t in ins):
            return f"{name} from the device to the host"
    return None


def _desc(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), str(v.dtype), tuple(v.stride()), v.device.type)
    if isinstance(v, (list, tuple)):
        return tuple(_desc(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _desc(x)) for k, x in v.items()))
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(v)
    return type(v).__name__


class Watch(TorchDispatchMode):
    """Every aten op outside kernel launches: ``ops`` (name, arguments, results described by
    shape, dtype and strides) and ``syncs`` (what synchronised, with the op)."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self.syncs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if launch.in_launch():
            return func(*args, **kwargs)
        why = sync_reason(func, args, kwargs)
        if why:
            self.syncs.append(why)
        out = func(*args, **kwargs)
        self.ops.append((func._schema.name, _desc(args), _desc(kwargs), _desc(out)))
        return out


def _inside_moe_op(mode, func, types, args, kwargs):
    """``moec.ops.moe`` is one custom op to the dispatcher: watch the ops its implementation makes."""
    mode.ops.append((func._schema.name, _desc(args), _desc(kwargs)))
    with mode:
        return _moe_op._init_fn(*args, **(kwargs or {}))


_moe_op.register_torch_dispatch(Watch, _inside_moe_op)


@contextlib.contextmanager
def host_reads(found: list):
    """Record ``tolist``/``numpy``/``__array__`` outside kernel launches (on a CPU they read the
    tensor's memory without any aten op)."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "__array__")}

    def watched(name, fn):
        def call(self, *args, **kwargs):
            if not launch.in_launch():
                found.append(f"Tensor.{name}")
            return fn(self, *args, **kwargs)
        return call
    for name, fn in originals.items():
        setattr(torch.Tensor, name, watched(name, fn))
    try:
        yield found
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def trace(fn):
    """Run ``fn`` once; returns ``(result, ops, syncs, launches)``."""
    reads: list = []
    with launch.recording() as recs, host_reads(reads), Watch() as w:
        out = fn()
    launches = []
    for r in recs:
        assert all(type(g) is int for g in r.grid), f"{r.kernel.fn_name}: grid {r.grid} is not host ints"
        assert all(isinstance(v, (bool, int, float)) for v in r.scalars.values()), (r.kernel.fn_name, r.scalars)
        launches.append((r.kernel.fn_name, r.grid, tuple(sorted(r.scalars.items())),
                         tuple(sorted(r.constexprs.items())), r.num_warps, r.num_stages))
    return out, w.ops, w.syncs + reads, launches


def first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"entry {i}: {x} != {y}"
    return f"lengths {len(a)} != {len(b)}"


def routed_inputs(w_router: torch.Tensor, T: int, routing: str, seed: int = 0) -> torch.Tensor:
    """``x [T, d]`` that routes every token to the same experts (``one``), token t towards expert
    ``t mod E`` (``spread``), ties every expert (``ties``: zeros) or at random."""
    E, d = w_router.shape
    gen = torch.Generator().manual_seed(seed + T)
    if routing == "random":
        return torch.randn(T, d, generator=gen)
    if routing == "ties":
        return torch.zeros(T, d)
    dirs = w_router.detach().float() / w_router.detach().float().norm(dim=1, keepdim=True)
    rows = torch.zeros(T, dtype=torch.long) if routing == "one" else torch.arange(T) % E
    return 4.0 * dirs[rows] + 0.01 * torch.randn(T, d, generator=gen)


def check_routing_independent(run, w_router, Ts, routings=ROUTINGS, route=None):
    """(a), (b), (c) for ``run(x)`` over ``routings`` at each T (two of them, the extremes, at a
    large T: the interpreter is slow there; at T = 1 "spread" is "one"), after one untraced
    warm-up call at T = 1 (the first call compiles and stacks weights; a new bucket's first call
    only imports its kernel's module, no torch op).
    ``route(x) -> ids`` (optional) shows that the routings really differ."""
    run(routed_inputs(w_router, 1, "random", seed=1))
    for T in Ts:
        seen, hits = {}, {}
        now = routings if T <= max(SMALL_T) else ("one", "random")
        for routing in (r for r in now if not (T == 1 and r == "spread")):
            x = routed_inputs(w_router, T, routing)
            out, ops, syncs, launches = trace(lambda: run(x))
            assert not syncs, f"T={T} {routing}: host synchronisation: {syncs}"
            assert launches, f"T={T} {routing}: no kernel was launched"
            y = out[0] if isinstance(out, tuple) else out
            assert torch.isfinite(y).all(), (T, routing)
            if route is not None:
                hits[routing] = tuple(torch.bincount(route(x).reshape(-1).long().clamp_min(0),
                                                     minlength=w_router.shape[0]).tolist())
            seen[routing] = (ops, launches)
        first = next(iter(seen))
        base_ops, base_launches = seen[first]
        for routing, (ops, launches) in seen.items():
            assert ops == base_ops, f"T={T}: op trace of {routing!r} differs from {first!r}: " \
                                    f"{first_difference(ops, base_ops)}"
            assert launches == base_launches, f"T={T}: launches of {routing!r} differ: " \
                                              f"{first_difference(launches, base_launches)}"
        if route is not None and T > 1:
            assert len(set(hits.values())) > 1, f"T={T}: the routings did not route differently: {hits}"


# ---- compiled zoo layers ---------------------------------------------------------------------------

def compiled_layer(cls, **kwargs):
    torch.manual_seed(0)
    m = cls(**kwargs).eval()
    moec.compile(m, arch="sm90")
    region = m.__dict__["_moec_region"]
    w = region.weights(list(region.lifted.param_tensors(m)))
    d = w.w_router.shape[1]

    def run(x):
        with torch.no_grad():
            return m(x.view(1, -1, d))

    def route(x):       # the routing before capacity
        cfg = region.spec.router.replace(capacity_factor=None, overflow="drop")
        return ref.route(ref.router_logits(x, w.w_router, w.b_router), cfg, w.score_bias)[0]
    return m, region, w, run, route


# one layer per host-side path: routed GLU experts, groups + score bias + shared expert,
# sigmoid-gated shared expert + logits output, aux-loss output, top-1 plain experts, capacity
LAYERS = {
    "mixtral": (zoo.MixtralMoE, dict(E=8)),
    "deepseek_v3": (zoo.DeepseekV3MoE, {}),
    "qwen_shared_logits": (zoo.QwenMoE, {}),
    "aux_loss": (zoo.AuxLossMoE, {}),
    "switch": (zoo.SwitchMoE, {}),
    "capacity_drop": (zoo.CapacityMoE, dict(E=8, capacity_factor=0.5)),
    "identity_expert": (zoo.IdentityExpertMoE, {}),
    "switch_capacity_per_sequence": (zoo.SwitchCapacityMoE, dict(expert_capacity=2)),
}


@pytest.fixture
def under_capture(monkeypatch):
    """Expert capacity takes the schedule it takes while a CUDA graph is being captured."""
    monkeypatch.setattr(capacity, "capturing", lambda device: True)


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_zoo_layer_is_graph_safe_at_decode(name, under_capture):
    cls, kwargs = LAYERS[name]
    m, region, w, run, route = compiled_layer(cls, **kwargs)
    check_routing_independent(run, w.w_router, SMALL_T, route=route)
    c = next(iter(region.compiled.values()))
    assert c.program.graph_safe and "CUDA graphs: a call can be captured" in m.explain()
    tiles = [s.variant(16).params.tile for s in c.program.steps if s.node.op == "grouped_gemm"]
    assert tiles and all(t.block_m == 16 for t in tiles), f"decode tiles pad expert rows: {tiles}"


def test_noisy_layer_in_training_is_graph_safe():
    """Training draws the router noise with a fixed-shape ``randn`` (graph-capturable RNG)."""
    torch.manual_seed(0)
    m = zoo.NoisyTopKMoE().train()
    moec.compile(m, arch="sm90")
    w_router = m.w_gate.weight

    def run(x):
        with torch.no_grad():
            return m(x.view(1, -1, x.shape[-1]))
    check_routing_independent(run, w_router, (7,), routings=("one", "random"))


def test_compiled_layer_is_graph_safe_in_the_largest_bucket():
    m, region, w, run, route = compiled_layer(zoo.MixtralMoE, E=8)
    check_routing_independent(run, w.w_router, (LARGE_T,), route=route)
    step = next(s for s in next(iter(region.compiled.values())).program.steps if s.node.op == "grouped_gemm")
    assert step.variant(LARGE_T).bound is None and step.variant(LARGE_T) is not step.variant(16)


# ---- moec.ops.moe -------------------------------------------------------------------------------------

def _op_weights(E=8, d=16, f=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, d, generator=g) / 4, torch.randn(E, f, d, generator=g) / 4,
            torch.randn(E, d, f, generator=g) / 6, torch.randn(E, f, d, generator=g) / 4)


def test_ops_moe_is_graph_safe():
    """``moec.ops.moe`` compiles for the tensors' device (the interpreter's one-bucket tile table
    here), so a larger T checks the op's own path at a larger grid."""
    wr, wu, wd, wg = _op_weights()

    def run(x):
        return moec.ops.moe(x, wr, wu, wd, wg, top_k=2, renormalize=True)

    def route(x):
        return ref.route(ref.router_logits(x, wr), RouterConfig(8, 2, renormalize=True))[0]
    check_routing_independent(run, wr, SMALL_T + (300,), route=route)


# ---- expert capacity ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def next_best_layer():
    return compiled_layer(zoo.CapacityMoE, E=8, capacity_factor=0.5, overflow="next_best")


def test_capacity_next_best_is_graph_safe_under_capture(next_best_layer, under_capture):
    m, region, w, run, route = next_best_layer
    check_routing_independent(run, w.w_router, (7, 16), route=route)
    assert next(iter(region.compiled.values())).program.graph_safe


def test_capacity_next_best_outside_capture_stops_early(next_best_layer):
    """Not capturing, the next-best loop reads "anything pending?" once per round (a host read,
    which is what the reference's greedy loop costs) and stops when nothing is."""
    m, region, w, run, route = next_best_layer
    x = routed_inputs(w.w_router, 7, "random")
    run(x)
    _, _, syncs, _ = trace(lambda: run(x))
    assert syncs and set(syncs) <= {"aten::_local_scalar_dense", "aten::is_nonzero"}


@pytest.mark.parametrize("overflow", ["drop", "next_best"])
@pytest.mark.parametrize("capture", [False, True])
def test_device_capacity_equals_the_reference(overflow, capture, monkeypatch):
    """`moec.runtime.capacity.apply_capacity` gives exactly the reference's ids and weights (ties,
    all tokens on one expert, group-limited selection whose other experts are never candidates)."""
    monkeypatch.setattr(capacity, "capturing", lambda device: capture)
    configs = [RouterConfig(4, 1), RouterConfig(8, 2, renormalize=True), RouterConfig(6, 6),
               RouterConfig(8, 3, order="topk_then_score"),
               RouterConfig(8, 2, score="sigmoid", score_bias=True, n_group=4, topk_group=2,
                            group_score="top2_sum", renormalize=True, routed_scaling=2.5)]
    sizes = [dict(capacity_factor=0.25), dict(capacity_factor=1.0), dict(capacity_factor=0.25, min_capacity=3),
             dict(capacity_factor=0.4, capacity_round="floor", min_capacity=0),
             dict(expert_capacity=2, capacity_per="sequence"), dict(capacity_factor=1.0, capacity_per="sequence")]
    if overflow == "drop":
        sizes += [dict(expert_capacity=1, capacity_per="sequence", dropped="pass"), dict(capacity_factor=0.5,
                                                                                        dropped="pass")]
    sizes += [dict(capacity_factor=0.5, renormalize_kept=True)]          # (for the routers that renormalise)
    cases = 0
    for base in configs:
        for size in sizes:
            if size.get("renormalize_kept") and not (base.renormalize and base.order == "score_then_topk"):
                continue
            cfg = base.replace(overflow=overflow, **size)
            for T in (0, 1, 5, 33):
                group = 11 if T == 33 else None                   # three sequences of 11
                for seed in range(3):
                    g = torch.Generator().manual_seed(seed * 100 + T)
                    logits = torch.randn(T, cfg.num_experts, generator=g)
                    if seed == 1:
                        logits = logits.round()                   # ties
                    if seed == 2 and T:
                        logits[:] = logits[0]                     # every token on the same experts
                    sb = torch.randn(cfg.num_experts, generator=g) * 0.1 if cfg.score_bias else None
                    ids, wts, _ = ref.route(logits, cfg.without_capacity(), sb)
                    want_ids, want_w, _ = ref.route(logits, cfg, sb, group)
                    got_ids, got_w = capacity.apply_capacity(ids.to(torch.int32), wts, logits, cfg, sb, group)
                    assert got_ids.dtype == torch.int32 and torch.equal(got_ids.long(), want_ids), (cfg, T, seed)
                    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=0)
                    cases += 1
    assert cases >= 300


# ---- positive controls: what is not graph-safe is reported and caught ------------------------------------

def test_unfused_router_is_reported_and_caught():
    """Noisy gating with capacity keeps its router unfused (capacity ranks by the noisy scores):
    the reference's torch code runs it, which synchronises; graph_safe and explain() say so."""
    spec = MoESpec(16, 32, RouterConfig(4, 2, noisy=True, capacity_factor=1.0))
    c = compile_spec(spec, torch.float32, ("y",), ARCHS["cpu"])
    assert not c.program.graph_safe and "route" in c.program.graph_unsafe_steps()
    gen = torch.Generator().manual_seed(0)
    w = MoEWeights(w_router=torch.randn(4, 16, generator=gen), w_up=torch.randn(4, 32, 16, generator=gen),
                   w_down=torch.randn(4, 16, 32, generator=gen), w_gate=torch.randn(4, 32, 16, generator=gen),
                   w_noise=torch.randn(4, 16, generator=gen))
    x = torch.randn(7, 16, generator=gen)
    _, _, syncs, _ = trace(lambda: c.program.run(moe_inputs(x, w), training=True, noise=torch.randn(7, 4)))
    assert syncs
    from moec.region import _graph_line
    assert _graph_line(c.program).startswith("CUDA graphs: not capturable: ") and "route" in _graph_line(c.program)


def test_eager_reference_is_caught():
    """The detector works: the eager reference's loop over hit experts synchronises and its op
    trace depends on the routing."""
    wr, wu, wd, wg = _op_weights()
    spec = MoESpec(16, 32, RouterConfig(8, 2))
    w = MoEWeights(w_router=wr, w_up=wu, w_down=wd, w_gate=wg)
    traces = []
    for routing in ("one", "random"):
        x = routed_inputs(wr, 16, routing)
        _, ops, syncs, _ = trace(lambda: ref.moe(x, w, spec))
        assert "aten::nonzero" in syncs
        traces.append(ops)
    assert traces[0] != traces[1]


# ---- the generated backward ---------------------------------------------------------------------------

def test_backward_program_is_graph_safe():
    """The backward program of a layer (aux loss, gated shared expert): no host synchronisation, and the
    same ops and launches whatever the routing (its router and gate backward are written-out formulas)."""
    from moec.compiler import BackwardRecipe, MoERecipe, compile_program
    from moec.ir.backward import saved_values
    from moec.spec import SharedExpertConfig
    spec = MoESpec(16, 32, RouterConfig(8, 2, renormalize=True, aux_loss=True), shared=SharedExpertConfig(24, True))
    recipe = MoERecipe(spec, ("y", "aux"))
    fwd = compile_program(recipe, torch.float32, ARCHS["sm90"])
    bwd = compile_program(BackwardRecipe(recipe), torch.float32, ARCHS["sm90"])
    assert bwd.program.graph_safe, bwd.program.graph_unsafe_steps()
    g = torch.Generator().manual_seed(0)
    wr, wu, wd, wg = _op_weights()
    w = MoEWeights(w_router=wr, w_up=wu, w_down=wd, w_gate=wg, shared_up=torch.randn(24, 16, generator=g) / 4,
                   shared_gate=torch.randn(24, 16, generator=g) / 4, shared_down=torch.randn(16, 24, generator=g) / 5,
                   shared_gate_proj=torch.randn(1, 16, generator=g) / 4)
    names = {n for n, _ in bwd.graph.inputs}

    def run(x):
        env = fwd.program.run(moe_inputs(x, w), values=True)
        inputs = {**moe_inputs(x, w), **{r: env[v] for r, v in saved_values(fwd.graph).items()},
                  "dy": torch.ones_like(x), "d_aux": torch.tensor(0.5)}
        return tuple(bwd.program.run({n: v for n, v in inputs.items() if n in names}))

    def route(x):
        return ref.route(ref.router_logits(x, wr), spec.router)[0]
    check_routing_independent(run, wr, SMALL_T, route=route)
