"""What an MoE layer computes, as plain data: the router configuration and the layer's shape.

These frozen dataclasses are the contract between the frontend (which reads them off user
code), the IR (whose `route` op carries a `RouterConfig`), the eager reference
(`moec.reference`) and the generated kernels. Every field has one meaning, written here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

SCORES = ("softmax", "sigmoid", "sqrtsoftplus")     # sqrtsoftplus: sqrt(softplus(x)), DeepSeek-V4
ORDERS = ("score_then_topk", "topk_then_score", "logits_then_score")
GROUP_SCORES = ("max", "top2_sum")
OVERFLOWS = ("drop", "next_best")
CAPACITY_GROUPS = ("batch", "sequence")
DROPPED_PAIRS = ("zero", "pass")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")     # relu2: relu(x)**2


class MoESpecError(ValueError):
    """A configuration or input that moec cannot compute correctly; the message names why."""


GLU_PLAIN = {"act_alpha": 1.0, "glu_limit": None, "up_shift": 0.0, "gate_softcap": None, "up_softcap": None}


def glu_fields(obj) -> dict:
    """The GLU variant's fields (`GLU_PLAIN`'s keys) of an object that carries them (`MoESpec`, a grouped
    GEMM's params)."""
    return {k: getattr(obj, k) for k in GLU_PLAIN}


def check_glu_variant(activation, glu: bool, act_alpha: float = 1.0, glu_limit=None, up_shift: float = 0.0,
                      gate_softcap=None, up_softcap=None) -> None:
    """Raise `MoESpecError` unless the GLU variant (see `MoESpec`) is well formed."""
    for name, cap in (("gate_softcap", gate_softcap), ("up_softcap", up_softcap)):
        if cap is not None and not (math.isfinite(cap) and cap > 0):
            raise MoESpecError(f"{name} must be a positive finite number, got {cap}")
        if cap is not None and not glu:
            raise MoESpecError(f"{name} is a GLU option; the experts are not gated (glu=False)")
    if gate_softcap is not None and activation != "silu":
        raise MoESpecError(f"gate_softcap applies to silu only, activation is {activation!r}")
    if act_alpha != 1.0 and activation != "silu":
        raise MoESpecError(f"act_alpha={act_alpha} applies to silu only, activation is {activation!r}")
    if not (math.isfinite(act_alpha) and act_alpha > 0):
        raise MoESpecError(f"act_alpha must be a positive finite number, got {act_alpha}")
    if (glu_limit is not None or up_shift != 0.0) and not glu:
        raise MoESpecError("glu_limit and up_shift are GLU options; the experts are not gated (glu=False)")
    if glu_limit is not None and not (math.isfinite(glu_limit) and glu_limit > 0):
        raise MoESpecError(f"glu_limit must be a positive finite number, got {glu_limit}")
    if not math.isfinite(up_shift):
        raise MoESpecError(f"up_shift must be finite, got {up_shift}")


@dataclass(frozen=True)
class RouterConfig:
    """How token scores become (expert ids, weights).

    - ``score``: ``softmax`` over all E logits, or elementwise ``sigmoid`` or ``sqrtsoftplus``
      (``sqrt(softplus(x))``, DeepSeek-V4).
    - ``order``: ``score_then_topk`` scores every expert then keeps the k best;
      ``topk_then_score`` keeps the k best logits then applies softmax to just those (Mixtral);
      the latter equals softmax-then-top-k with renormalisation (canonicalisation uses this);
      ``logits_then_score`` ranks the logits (plus ``score_bias``, group-limited on them) and
      weights each pick by its score (Kolibri: top-k of ``logits + bias``, sigmoid of the picks).
    - ``renormalize``: divide the k kept weights by their sum.
    - ``routed_scaling``: multiply the final weights by this factor (DeepSeek-V3: 2.5).
    - ``score_bias``: a per-expert bias added to the scores for *selection only*; the weights
      use the unbiased scores (DeepSeek-V3 ``e_score_correction_bias``).
    - ``n_group``/``topk_group``: group-limited selection: experts are cut into ``n_group``
      equal groups, each group scored by ``group_score`` of its (biased) scores (``max``, or
      ``top2_sum``: the sum of its two best), and only experts of the ``topk_group`` best
      groups may be chosen.
    - ``capacity_factor``: when set, each expert keeps at most
      ``C = max(min_capacity, ceil(capacity_factor * G * k / E))`` (``floor`` with ``capacity_round``,
      as code that truncates with ``int()`` computes it) (token, slot) pairs of each
      capacity group of G tokens; ``expert_capacity`` instead fixes ``C`` (Switch Transformer's
      config). ``capacity_per``: the group is every token of the call (``"batch"``: G = T) or each
      sequence of an input ``[B, S, d]`` (``"sequence"``: G = S; `group_tokens`).
      Priority within a group is slot-major (every token's first choice before any second choice),
      then token order. Overflowing pairs are dropped or, with ``overflow="next_best"``, moved to the
      token's next-ranked expert that still has room (weight: that expert's score, under the same
      normalisation); a pair that finds no room is dropped. ``dropped``: a dropped pair adds nothing
      (``"zero"``: weight 0) or passes its token through (``"pass"``: it keeps its routed weight and
      adds ``weight * x``, Switch Transformer's dropped tokens; with ``overflow="drop"``).
      ``renormalize_kept``: with ``renormalize``, the weights are normalised over the pairs capacity
      kept instead of the top-k choices (fairseq's and DeepSpeed's top-2 gating: a token whose second
      choice was dropped gives its first the whole weight; the sum is clamped at fp32's eps).
    - ``noisy``: noisy top-k gating: in training mode logits get
      ``noise * softplus(x @ w_noise.T)`` with ``noise ~ N(0, 1)`` drawn as ``torch.randn``
      of shape ``[T, E]``; in eval mode no noise is added.
    - ``token_table``: the choices are given, not ranked: each token's k choices are its row of an integer
      table ``[V, k]`` the layer holds, indexed by the token's id (hash routing: DeepSeek-V4's first layers).
      The scores weight the given choices (``renormalize``, ``routed_scaling`` as above); a choice may repeat
      (its expert then runs once per repeat). No selection bias, groups, noise, capacity or aux loss.
    - ``aux_loss``: also return the load-balancing loss ``E * sum_e (n_e / T) * P_e``, where
      ``n_e`` counts the (token, slot) pairs routed to e before capacity (``aux_counts="pairs"``) or the
      tokens whose first choice is e (``"first"``: fairseq's and DeepSpeed's top-2 ``l_aux``) and ``P_e``
      is the mean over tokens of the normalised scores (softmax of logits, or sigmoid scores / their sum).
    Ties between equal scores go to the lower expert index.
    """

    num_experts: int
    top_k: int
    score: str = "softmax"
    order: str = "score_then_topk"
    renormalize: bool = False
    routed_scaling: float = 1.0
    score_bias: bool = False
    router_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    capacity_factor: Optional[float] = None
    overflow: str = "drop"
    noisy: bool = False
    aux_loss: bool = False
    expert_capacity: Optional[int] = None
    min_capacity: int = 1
    capacity_per: str = "batch"
    dropped: str = "zero"
    renormalize_kept: bool = False
    capacity_round: str = "ceil"
    aux_counts: str = "pairs"
    token_table: bool = False

    def __post_init__(self) -> None:
        E, k = self.num_experts, self.top_k
        if E < 1:
            raise MoESpecError(f"num_experts must be >= 1, got {E}")
        if not 1 <= k <= E:
            raise MoESpecError(f"top_k must be in [1, num_experts={E}], got {k}")
        for name, allowed in (("score", SCORES), ("order", ORDERS),
                              ("group_score", GROUP_SCORES), ("overflow", OVERFLOWS)):
            if getattr(self, name) not in allowed:
                raise MoESpecError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.order == "topk_then_score" and (self.score != "softmax" or self.score_bias or self.n_group > 1):
            raise MoESpecError("order='topk_then_score' ranks raw logits: it is defined for softmax scores "
                               "without score_bias or group-limited selection")
        if self.n_group < 1 or E % self.n_group:
            raise MoESpecError(f"n_group={self.n_group} must divide num_experts={E}")
        if self.n_group > 1:
            per = E // self.n_group
            if not 1 <= self.topk_group <= self.n_group:
                raise MoESpecError(f"topk_group must be in [1, n_group={self.n_group}]")
            if self.topk_group * per < k:
                raise MoESpecError(
                    f"topk_group={self.topk_group} groups of {per} experts hold fewer than top_k={k}")
            if self.group_score == "top2_sum" and per < 2:
                raise MoESpecError("group_score='top2_sum' needs at least 2 experts per group")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise MoESpecError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.expert_capacity is not None and (isinstance(self.expert_capacity, bool) or
                                                 not isinstance(self.expert_capacity, int) or self.expert_capacity < 1):
            raise MoESpecError(f"expert_capacity must be an int >= 1, got {self.expert_capacity!r}")
        if self.expert_capacity is not None and self.capacity_factor is not None:
            raise MoESpecError("set capacity_factor or expert_capacity, not both")
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise MoESpecError(f"min_capacity must be an int >= 0, got {self.min_capacity!r}")
        for name, allowed in (("capacity_per", CAPACITY_GROUPS), ("dropped", DROPPED_PAIRS),
                              ("capacity_round", ("ceil", "floor")), ("aux_counts", ("pairs", "first"))):
            if getattr(self, name) not in allowed:
                raise MoESpecError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.has_capacity and ((self.capacity_per, self.dropped, self.min_capacity, self.capacity_round)
                                      != ("batch", "zero", 1, "ceil") or self.renormalize_kept):
            raise MoESpecError("capacity_per, dropped, min_capacity, capacity_round and renormalize_kept describe an "
                               "expert capacity: set capacity_factor or expert_capacity")
        if self.renormalize_kept and not (self.has_capacity and self.renormalize and self.dropped == "zero"
                                          and self.order == "score_then_topk"):
            raise MoESpecError("renormalize_kept normalises the weights over the pairs capacity kept: it needs a "
                               "capacity, renormalize=True, order='score_then_topk' and dropped='zero'")
        if self.aux_counts != "pairs" and not self.aux_loss:
            raise MoESpecError("aux_counts says what the load-balancing loss counts: it needs aux_loss=True")
        if self.dropped == "pass" and self.overflow != "drop":
            raise MoESpecError("dropped='pass' passes a pair through where it overflows: it needs overflow='drop'")
        if self.token_table and (self.score_bias or self.n_group > 1 or self.noisy or self.has_capacity
                                 or self.aux_loss or self.order == "logits_then_score"):
            raise MoESpecError("token_table gives the choices: no selection bias, groups, noise, capacity, aux loss "
                               "or order='logits_then_score' (which only rank)")

    @property
    def has_capacity(self) -> bool:
        return self.capacity_factor is not None or self.expert_capacity is not None

    def without_capacity(self) -> "RouterConfig":
        """This routing before capacity (what the fused route kernel computes)."""
        return self.replace(capacity_factor=None, expert_capacity=None, min_capacity=1, overflow="drop",
                            capacity_per="batch", dropped="zero", renormalize_kept=False, capacity_round="ceil")

    def replace(self, **changes) -> "RouterConfig":
        return dataclasses.replace(self, **changes)

    def capacity(self, group_tokens: int) -> Optional[int]:
        """Per-expert capacity of a capacity group of ``group_tokens`` tokens (None: unlimited)."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        if self.capacity_factor is None:
            return None
        exact = self.capacity_factor * group_tokens * self.top_k / self.num_experts
        return max(self.min_capacity, math.ceil(exact) if self.capacity_round == "ceil" else math.floor(exact))

    def group_tokens(self, T: int, group_size: Optional[int]) -> int:
        """Tokens per capacity group of a call of T tokens whose sequences hold ``group_size`` (None: one
        sequence); raises `MoESpecError` when they do not tile T."""
        if self.capacity_per == "batch" or group_size is None or T == 0:
            return T
        if group_size < 1 or T % group_size:
            raise MoESpecError(f"per-sequence capacity: {T} tokens are not sequences of {group_size}")
        return group_size


@dataclass(frozen=True)
class SharedExpertConfig:
    """Dense expert(s) every token passes through, added to the routed output.

    ``width`` is the total intermediate size (DeepSeek: n_shared * moe_intermediate);
    ``gated``: the output is scaled per token by ``sigmoid(x @ w_shared_gate.T)`` (Qwen-MoE);
    ``variant``: its own GLU variant, as ``(field, value)`` pairs of the fields that differ from plain GLU
    (`GLU_PLAIN`'s keys; ``()``: plain GLU), when it differs from the routed experts' (HunYuan-V4 clamps the
    routed experts' SwiGLU, not the shared expert's); None: the layer's.
    """

    width: int
    gated: bool = False
    variant: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.variant is not None:
            pairs = tuple(self.variant)
            bad = [p for p in pairs if not (isinstance(p, tuple) and len(p) == 2 and p[0] in GLU_PLAIN)]
            if bad or len({k for k, _ in pairs}) != len(pairs):
                raise MoESpecError(f"shared.variant must be (field, value) pairs of distinct fields among "
                                   f"{sorted(GLU_PLAIN)}, got {self.variant!r}")
            # canonical: sorted, plain values dropped (equal variants compare and hash equal)
            object.__setattr__(self, "variant", tuple(sorted((k, v) for k, v in pairs if v != GLU_PLAIN[k])))


@dataclass(frozen=True)
class MoESpec:
    """One MoE layer: hidden size ``hidden``, expert width ``ffn``, a router, an activation.

    ``glu``: experts compute ``down(act(gate(x)) * up(x))`` (SwiGLU when act is silu);
    otherwise ``down(act(up(x)))``.

    GLU variants (GPT-OSS uses all three: ``act_alpha=1.702, glu_limit=7.0, up_shift=1.0``):

    - ``act_alpha``: silu's slope, ``act(x) = x * sigmoid(act_alpha * x)`` (silu only);
    - ``glu_limit``: clamp ``gate`` to ``<= glu_limit`` and ``up`` to ``[-glu_limit, glu_limit]``
      before the activation and the product;
    - ``up_shift``: ``up + up_shift`` enters the product;
    - ``gate_softcap`` / ``up_softcap`` (Inkling2's softcapped SwiGLU): with ``softcap_c(x) = c * tanh(x / c)``,
      ``act(gate) = softcap(gate) * sigmoid(act_alpha * gate)`` (the sigmoid sees the raw gate) and
      ``softcap(up)`` enters the product (before ``up_shift``), all in fp32;
    - ``expert_bias``: each expert's projections add a bias (``b_gate``/``b_up`` ``[E, f]``,
      ``b_down`` ``[E, d]``); the routing weight multiplies the down projection *with* its bias.
      A shared expert stays bias-free; it computes the layer's activation, with the same GLU variant
      (MiniMax-M3 clamps both alike) unless ``shared.variant`` gives its own (HunYuan-V4: clamped routed
      experts, a plain shared one).

    ``identity_experts``: the router's last ``identity_experts`` choices are identity ("zero-computation")
    experts (LongCat-Flash): a pick of one adds ``weight * x`` and runs no MLP. The MLP experts are the
    first ``ffn_experts = router.num_experts - identity_experts`` choices; expert weights have that many.

    ``input_scaled`` (Llama4): the routing weight scales each expert's *input* instead of its output,
    ``y = sum_s down_e(act(gate_e(w_s x)) * up_e(w_s x))``; the experts are bias-free (an expert a token did
    not pick then adds exactly nothing, as in code that runs every expert on ``weight * x``).

    ``expert_norm``: each pair's expert output is RMS-normalised (in fp32, with this eps) and scaled by its
    expert's own norm weight (``w_expert_norm [E, d]``) before the routing weight multiplies it (Ergo's expert
    norms); None: no norm.

    ``external_router``: the router is a module moec does not read (a small MLP, a router of the user's own
    making): its fp32 logits ``[T, E]`` are computed by calling it as the eager forward does (by PyTorch, under
    autograd) and enter the layer as an input; the kernels route them, and the backward yields their gradient.
    There is no router weight (``MoEWeights.w_router`` is None, ``MoEWeights.router`` computes the logits), no
    router bias and no noise.
    """

    hidden: int
    ffn: int
    router: RouterConfig
    activation: str = "silu"
    glu: bool = True
    shared: Optional[SharedExpertConfig] = None
    expert_bias: bool = False
    act_alpha: float = 1.0
    glu_limit: Optional[float] = None
    up_shift: float = 0.0
    gate_softcap: Optional[float] = None
    up_softcap: Optional[float] = None
    identity_experts: int = 0
    input_scaled: bool = False
    external_router: bool = False
    expert_norm: Optional[float] = None

    def __post_init__(self) -> None:
        if self.expert_norm is not None and not (math.isfinite(self.expert_norm) and self.expert_norm > 0):
            raise MoESpecError(f"expert_norm is the norm's eps: a positive finite number, got {self.expert_norm}")
        if self.expert_norm is not None and self.input_scaled:
            raise MoESpecError("expert norms with input-scaled experts are not supported")
        if self.external_router and (self.router.noisy or self.router.router_bias):
            raise MoESpecError("an external router's logits are given: it has no router bias and no noise "
                               "projection of moec's")
        if self.input_scaled and (self.expert_bias or self.identity_experts or self.router.dropped == "pass"):
            raise MoESpecError("input_scaled experts scale each expert's input by its routing weight: they are "
                               "bias-free, with no identity experts and no passed-through pairs")
        if not 0 <= self.identity_experts < self.router.num_experts:
            raise MoESpecError(f"identity_experts must be in [0, router.num_experts={self.router.num_experts}), "
                               f"got {self.identity_experts}")
        if self.identity_experts and self.router.has_capacity:
            raise MoESpecError("identity experts with an expert capacity are not supported")
        if self.activation not in ACTIVATIONS:
            raise MoESpecError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.hidden < 1 or self.ffn < 1:
            raise MoESpecError(f"hidden and ffn must be positive, got {self.hidden}, {self.ffn}")
        check_glu_variant(self.activation, self.glu, **glu_fields(self))
        if self.shared is not None and self.shared.variant is not None:
            check_glu_variant(self.activation, self.glu, **{**GLU_PLAIN, **dict(self.shared.variant)})

    def describe(self) -> str:
        """The layer in one line of words (explain()'s head line of a lifted layer)."""
        r = self.router
        identity = f" + {self.identity_experts} identity" if self.identity_experts else ""
        bits = [f"{self.ffn_experts} experts{identity}", f"top-{r.top_k}", r.score]
        if r.token_table:
            bits.append("choices from a token table")
        if r.order == "topk_then_score":
            bits.append("top-k then softmax")
        if r.order == "logits_then_score":
            bits.append("top-k of the logits")
        if r.renormalize:
            bits.append("renormalised")
        if r.routed_scaling != 1.0:
            bits.append(f"scaled x{r.routed_scaling:g}")
        if r.score_bias:
            bits.append("selection bias")
        if r.n_group > 1:
            bits.append(f"group-limited {r.topk_group}/{r.n_group} ({r.group_score})")
        if r.has_capacity:
            size = f"capacity {r.capacity_factor:g}" if r.capacity_factor is not None else f"{r.expert_capacity} pairs"
            size += f" (at least {r.min_capacity})" if r.min_capacity > 1 else ""
            per = " per sequence" if r.capacity_per == "sequence" else ""
            how = (", dropped tokens pass through)" if r.dropped == "pass"
                   else ", weights over the kept pairs)" if r.renormalize_kept else ")")
            bits.append(f"{size} per expert{per} ({r.overflow}{how}")
        if r.noisy:
            bits.append("noisy gating")
        if r.aux_loss:
            bits.append("aux loss" + (" over the first choices" if r.aux_counts == "first" else ""))
        if r.router_bias:
            bits.append("router bias")
        if self.external_router:
            bits.append("logits from its own router module (run by PyTorch)")
        act = ("SwiGLU" if self.activation == "silu" else f"{self.activation} GLU") if self.glu else self.activation
        variant = [f"{k}={v:g}" for k, v in self.glu_variant.items()]
        if variant:
            act += f" ({', '.join(variant)})"
        bits.append(f"{act} experts{' with biases' if self.expert_bias else ''} d={self.hidden} f={self.ffn}"
                    + (" seeing weight * x (input-scaled)" if self.input_scaled else "")
                    + (f", each output RMS-normalised by its expert's scale (eps={self.expert_norm:g})"
                       if self.expert_norm is not None else ""))
        if self.shared is not None:
            own = ""
            if self.shared.variant is not None:
                own = ", its own GLU: " + (", ".join(f"{k}={v:g}" for k, v in self.shared.variant) or "plain")
            gated = " (sigmoid-gated)" if self.shared.gated else ""
            bits.append(f"shared expert f={self.shared.width}{gated}{own}")
        return ", ".join(bits)

    @property
    def glu_variant(self) -> dict:
        """The GLU variant as IR attributes (only the ones that differ from plain GLU)."""
        return {k: v for k, v in glu_fields(self).items() if v != GLU_PLAIN[k]}

    @property
    def shared_variant(self) -> dict:
        """The shared expert's GLU variant as IR attributes: its own (``shared.variant``) or the layer's."""
        if self.shared is not None and self.shared.variant is not None:
            return dict(self.shared.variant)
        return self.glu_variant

    @property
    def num_experts(self) -> int:
        """The router's choices (MLP and identity experts)."""
        return self.router.num_experts

    @property
    def ffn_experts(self) -> int:
        """The experts that run an MLP: the router's first choices (`identity_experts` follow them)."""
        return self.router.num_experts - self.identity_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k


@dataclass
class MoEWeights:
    """The tensors of one MoE layer, in ``nn.Linear`` layout ``[out, in]`` per expert.

    Expert weights are ``[E, out, in]`` tensors or views (a ``[E, in, out]`` parameter is passed
    as ``.transpose(1, 2)``; kernels read strides, so no copy is made). An external router
    (`MoESpec.external_router`) has no ``w_router``: ``router(x)`` gives its logits ``[T, E]``. An external
    shared expert (a module of the layer moec does not read: one with a norm of its own, an activation other
    than the routed experts') is ``shared``: its output ``shared(x)`` is added to the layer's, outside the kernels.
    """

    w_router: Optional[torch.Tensor]            # [E, d]; None for an external router
    w_up: torch.Tensor                          # [E, f, d]
    w_down: torch.Tensor                        # [E, d, f]
    w_gate: Optional[torch.Tensor] = None       # [E, f, d] when glu
    b_router: Optional[torch.Tensor] = None     # [E]
    score_bias: Optional[torch.Tensor] = None   # [E], selection only
    w_noise: Optional[torch.Tensor] = None      # [E, d]
    shared_up: Optional[torch.Tensor] = None    # [fs, d]
    shared_down: Optional[torch.Tensor] = None  # [d, fs]
    shared_gate: Optional[torch.Tensor] = None  # [fs, d] when glu
    shared_gate_proj: Optional[torch.Tensor] = None  # [1, d] sigmoid gate on the shared output
    b_gate: Optional[torch.Tensor] = None       # [E, f] when expert_bias (and glu)
    b_up: Optional[torch.Tensor] = None         # [E, f] when expert_bias
    b_down: Optional[torch.Tensor] = None       # [E, d] when expert_bias
    w_expert_norm: Optional[torch.Tensor] = None  # [E, d] when expert_norm (read in fp32)
    token_table: Optional[torch.Tensor] = None  # int [V, k] when router.token_table: token id -> its choices
    extras: dict = field(default_factory=dict)
    router: Optional[Callable[[torch.Tensor], torch.Tensor]] = None   # an external router: [T, d] -> [T, E]
    shared: Optional[Callable[[torch.Tensor], torch.Tensor]] = None   # an external shared expert: [T, d] -> [T, d]
