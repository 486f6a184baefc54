"""The op vocabulary: one `OpDef` per op, with its operands, results, attributes and semantics.

Operands and results are named by role. Shapes use ``T`` (tokens), ``k`` (top-k), ``E``
(experts), ``d`` (hidden), ``f``/``n`` (widths). A "pair" is one (token, slot) choice; pair
``p = t * k + s``; "sorted order" lists pairs grouped by expert (see ``dispatch``).
Each op's numeric meaning is implemented in `moec.ir.interp` as a few lines of torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from ..spec import ACTIVATIONS, GLU_PLAIN, RouterConfig
from .types import TensorType

ROUTER_FIELDS = tuple(f.name for f in dataclasses.fields(RouterConfig))
_ROUTER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RouterConfig)
                    if f.default is not dataclasses.MISSING}


class IRError(ValueError):
    """Ill-formed IR: the message names the node and the rule it breaks."""


@dataclass(frozen=True)
class OpDef:
    name: str
    doc: str
    operands: tuple[str, ...]                 # required operand roles
    results: tuple[str, ...]                  # result roles, in printed order
    optional_operands: tuple[str, ...] = ()
    optional_results: tuple[str, ...] = ()    # roles that may be absent ("_" in text)
    attrs: dict = field(default_factory=dict)  # name -> default (a required attr has default REQUIRED)
    infer: Callable | None = None             # (operand types by role, attrs) -> result types by role

    @property
    def all_operands(self) -> tuple[str, ...]:
        return self.operands + self.optional_operands


REQUIRED = object()
OPS: dict[str, OpDef] = {}
# the attributes of every op that lowers to a generated kernel: its tile per token-count bucket, where
# each bucket's tile came from, and the tune file entries that were ignored and why (set by
# choose-tiles; where a tile came from does not change the kernel, so these stay out of its source)
KERNEL_ATTRS = {"tiles": None, "tile_source": None, "tune_ignored": None}
PROVENANCE_ATTRS = ("tile_source", "tune_ignored")


def is_kernel(op_name: str) -> bool:
    """Whether ``op_name`` lowers to generated kernels (it takes tiles)."""
    return "tiles" in OPS[op_name].attrs


def op(name, doc, operands, results, infer, optional_operands=(), optional_results=(), attrs=None):
    OPS[name] = OpDef(name, doc, tuple(operands), tuple(results), tuple(optional_operands),
                      tuple(optional_results), dict(attrs or {}), infer)


def _rows(t: TensorType):
    return t.shape[0]


# ---- routing -------------------------------------------------------------------------------

def _infer_linear(o, a):
    return {"out": TensorType("f32", (_rows(o["x"]), o["w"].shape[0]))}


op("linear", "out[t] = x[t] @ w.T (+ b), accumulated and returned in fp32 (router logits).",
   ["x", "w"], ["out"], _infer_linear, optional_operands=["b"])


def _route_types(o, a, T):
    k = a["top_k"]
    return {"ids": TensorType("i32", (T, k)), "weights": TensorType("f32", (T, k)),
            "aux": TensorType("f32", ())}


op("route", "Top-k routing of fp32 logits [T, E] under the RouterConfig held in the attributes "
   "(see moec.spec.RouterConfig): ids i32[T, k] (-1 = dropped by capacity), weights f32[T, k], "
   "aux: the load-balancing loss when aux_loss. noise_logits = x @ w_noise.T for noisy gating. With token_table "
   "the choices are given (choices int[T, k]: each token's row of the layer's token table) and only weighted.",
   ["logits"], ["ids", "weights", "aux"], lambda o, a: _route_types(o, a, _rows(o["logits"])),
   optional_operands=["score_bias", "noise_logits", "choices"], optional_results=["aux"],
   attrs={**{n: REQUIRED for n in ("num_experts", "top_k")}, **_ROUTER_DEFAULTS})


def _infer_fused_route(o, a):
    T, E = _rows(o["x"] if "x" in o else o["logits"]), a["num_experts"]
    return {**_route_types(o, a, T), "counts": TensorType("i32", (E,)),
            "prob_sum": TensorType("f32", (E,)), "shared_scale": TensorType("f32", (T,)),
            "logits": TensorType("f32", (T, E)), **_infer_dispatch(o, a, T)}


op("fused_route", "One kernel: gate GEMM x @ w.T (+ b) (+ noise), score, group-limited top-k, "
   "renormalise, scale, per-expert pair counts (and prob_sum for the aux loss, the shared-expert "
   "gate sigmoid(x @ w_shared_gate.T), the router's logits before noise, and the pairs grouped by "
   "expert as dispatch gives them, with their tile schedule, when asked). Capacity is not applied here. "
   "Given fp32 logits [T, E] (an external router's) instead of x and w, it reads them: no GEMM. Given "
   "choices int[T, k] (token_table) it weights them instead of ranking.",
   [], ["ids", "weights", "order", "offsets", "counts", "prob_sum", "shared_scale", "logits", "schedule"],
   _infer_fused_route, optional_operands=["x", "w", "logits", "b", "score_bias", "w_noise", "w_shared_gate",
                                          "choices"],
   optional_results=["order", "offsets", "counts", "prob_sum", "shared_scale", "logits", "schedule"],
   attrs={**{n: REQUIRED for n in ("num_experts", "top_k")}, **_ROUTER_DEFAULTS, **KERNEL_ATTRS,
          "schedule_block_m": None})

op("aux_loss", "The load-balancing loss E * sum_e (counts_e / T) * (prob_sum_e / T); 0 when T = 0. With "
   "first_choice, counts_e are the tokens whose first choice (ids[:, 0]) is e, not the given pair counts.",
   ["counts", "prob_sum", "ids"], ["out"], lambda o, a: {"out": TensorType("f32", ())},
   attrs={"num_experts": REQUIRED, "first_choice": False})

op("apply_capacity", "Per-expert capacity on routed pairs (RouterConfig semantics: per capacity group (the "
   "call, or each sequence of the call's group_size tokens), slot-major priority, overflow dropped (id -1, "
   "weight 0, or kept for a pass-through) or moved to the next-best expert).",
   ["ids", "weights", "logits"], ["ids", "weights"],
   lambda o, a: {"ids": o["ids"], "weights": o["weights"]}, optional_operands=["score_bias"],
   attrs={**{n: REQUIRED for n in ("num_experts", "top_k")}, **_ROUTER_DEFAULTS})

op("identity_experts", "Identity (zero-computation) experts, the router's choices >= ffn_experts: ids = the "
   "choices with those set to -1 (no MLP runs for them: dropped pairs downstream), out[t] = x[t] * (sum of "
   "weights[t, s] over the slots that picked one, and with dropped over the pairs capacity dropped and "
   "passed through, ids -1), fp32.",
   ["x", "ids", "weights"], ["ids", "out"],
   lambda o, a: {"ids": o["ids"], "out": TensorType("f32", o["x"].shape)},
   attrs={"ffn_experts": REQUIRED, "dropped": False})

op("shared_gate", "scale[t] = sigmoid(x[t] @ w[0]) (fp32), the gate of a sigmoid-gated shared expert.",
   ["x", "w"], ["scale"], lambda o, a: {"scale": TensorType("f32", (_rows(o["x"]),))})

# ---- dispatch and experts ------------------------------------------------------------------


def _infer_dispatch(o, a, T=None):
    T, k = (T, a["top_k"]) if T is not None else o["ids"].shape
    return {"order": TensorType("i32", (T * k,)), "offsets": TensorType("i32", (a["num_experts"] + 1,)),
            "schedule": TensorType("i32", (3 * T * k + 1,))}


SCHEDULE_DOC = ("schedule (with schedule_block_m, the row tile per token-count bucket, {bound: BLOCK_M}): the grouped "
                "GEMMs' tile schedule: [0] the number of BLOCK_M-row tiles (each within one expert, in expert order), "
                "then per tile i its expert at 1 + i, first row at 1 + M + i, row end at 1 + 2 M + i (M = T * k); "
                "entries past the tile count are undefined.")

op("dispatch", "Sort pairs by expert: order[i] = pair p (stable: token order within an expert; dropped "
   "pairs last), expert e owns order[offsets[e]:offsets[e+1]]. No activations move. " + SCHEDULE_DOC,
   ["ids"], ["order", "offsets", "schedule"], _infer_dispatch, optional_results=["schedule"],
   attrs={"num_experts": REQUIRED, "schedule_block_m": None})

op("permute", "out[i] = x[order[i] // top_k]: token rows copied into sorted pair order; with scale, times "
   "scale.flat[order[i]] (computed in fp32, stored in x's dtype: experts whose input the routing weight scales).",
   ["x", "order"], ["out"],
   lambda o, a: {"out": TensorType(o["x"].dtype, (o["order"].shape[0], o["x"].shape[1]))},
   optional_operands=["scale"], attrs={"top_k": REQUIRED})


def _infer_gg(o, a):
    a_rows = _rows(o["a"])
    rows = a_rows * a["gather_top_k"] if a["gather_top_k"] else a_rows
    dtype = a["out_dtype"] or o["a"].dtype
    pre = TensorType(o["a"].dtype, (rows, o["w"].shape[1]))
    return {"out": TensorType(dtype, (rows, o["w"].shape[1])), "pre": pre, "pre_up": pre}


op("grouped_gemm", "Row i of the sorted rows belongs to expert e(i) (offsets; one expert when "
   "offsets is absent): h = A_i @ w[e].T (+ bias[e]); with glu: gated(h, A_i @ w_up[e].T (+ bias_up[e])), "
   "else act(h) when activation is set (gated: see activate). A_i = a[order[i] // gather_top_k] when "
   "gather_top_k > 0 (the permute folded into the prologue), else a[i]. scale multiplies row i by "
   "scale.flat[order[i]] (routed) or scale[i] (dense): its output, or with scale_in its A row (A_i @ w = "
   "(s A_i) @ w: before the biases and the activation); scatter stores row i at out[order[i]] (the "
   "un-permute folded into the epilogue). Rows of dropped pairs are left unwritten. fp32 accumulation. "
   "pre / pre_up (optional): h and the up product before the activation (biases added), in a's dtype, "
   "stored at out's rows: what a backward that saves rather than recomputes them reads. schedule (optional): "
   "the offsets' tile schedule for this node's BLOCK_M (see dispatch); where a tile's rows are, no change "
   "to the result.",
   ["a", "w"], ["out", "pre", "pre_up"], _infer_gg,
   optional_operands=["offsets", "w_up", "order", "scale", "bias", "bias_up", "schedule"],
   optional_results=["pre", "pre_up"],
   attrs={"num_experts": REQUIRED, "activation": None, "glu": False, **GLU_PLAIN, "gather_top_k": 0,
          "scatter": False, "scale_in": False, "out_dtype": None, **KERNEL_ATTRS})

op("activate", "out = act(gate) * (up + up_shift) (glu) or act(gate), computed in fp32, stored in gate's "
   "dtype; act_alpha is silu's slope (x * sigmoid(act_alpha * x)); glu_limit clamps gate <= limit and up "
   "to [-limit, limit] first (see moec.spec.MoESpec).",
   ["gate"], ["out"], lambda o, a: {"out": o["gate"]}, optional_operands=["up"],
   attrs={"activation": REQUIRED, "glu": False, **GLU_PLAIN})

op("combine", "out[t] = sum_s weights[t, s] * y[position of pair t*k+s in order] (without weights: the "
   "plain sum), skipping dropped pairs (ids = -1); fp32.",
   ["y", "order", "ids"], ["out"],
   lambda o, a: {"out": TensorType("f32", (_rows(o["ids"]), o["y"].shape[1]))},
   optional_operands=["weights"], attrs={"top_k": REQUIRED})

def _infer_expert_norm(o, a):
    return {"out": TensorType("f32", o["y"].shape)}


op("expert_norm", "Rows of y sorted by expert (offsets) RMS-normalised in fp32 with eps and scaled by their "
   "expert's row of w [E, d] (Ergo's expert norms), in fp32 (eager sums them unrounded): at their own rows (rows "
   "past offsets[E] are 0), or with scatter (fold-combine) times weights.flat[order[i]] at row order[i] of a "
   "pair-major buffer (rows of dropped pairs not written).",
   ["y", "w", "offsets"], ["out"], _infer_expert_norm, optional_operands=["order", "weights"],
   attrs={"eps": REQUIRED, "scatter": False, **KERNEL_ATTRS})

op("reduce_topk", "out[t] = sum_s y[t*k+s] over slots s in fixed order, skipping dropped pairs "
   "(ids = -1), + residual[t]; fp32 sum, stored in out_dtype. Deterministic: no atomics.",
   ["y", "ids"], ["out"],
   lambda o, a: {"out": TensorType(a["out_dtype"], (_rows(o["ids"]), o["y"].shape[1]))},
   optional_operands=["residual"], attrs={"top_k": REQUIRED, "out_dtype": REQUIRED, **KERNEL_ATTRS})

op("add", "out = a + b (fp32).", ["a", "b"], ["out"],
   lambda o, a: {"out": TensorType("f32", o["a"].shape)})

op("cast", "out = x converted to dtype.", ["x"], ["out"],
   lambda o, a: {"out": TensorType(a["dtype"], o["x"].shape)}, attrs={"dtype": REQUIRED})

# ---- alternatives ----------------------------------------------------------------------------

op("select", "out = a when the shape condition `when` holds for the call's sizes, else b (a sympy relation "
   "of the graph's symbols, e.g. 'ceiling(T/64) > 16'). Decided on the host from shapes alone; only the "
   "chosen operand's producers run.",
   ["a", "b"], ["out"], lambda o, a: {"out": o["a"]}, attrs={"when": REQUIRED})


def router_config(attrs: dict) -> RouterConfig:
    """The RouterConfig held in a routing op's attributes."""
    return RouterConfig(**{n: attrs[n] for n in ROUTER_FIELDS if n in attrs})


def router_attrs(cfg: RouterConfig) -> dict:
    return {n: getattr(cfg, n) for n in ROUTER_FIELDS}


def check_activation(name):
    if name is not None and name not in ACTIVATIONS:
        raise IRError(f"unknown activation {name!r}")


def glu_variant(attrs: dict) -> dict:
    """The GLU-variant attributes of a grouped_gemm/activate node (for `moec.reference.gated`)."""
    return {k: attrs[k] for k in GLU_PLAIN}
