"""The probe: run the module's own eager forward and `moec.reference.moe` on a few random inputs.

Matching by structure proposes; the probe confirms. `probe(module, lifted)` returns None when
they agree, else a message naming the mismatch. What it checks:
- token counts T = 1, 5 and 48, plus 48 tokens pushed towards expert 0 (so that a capacity
  limit, when there is one that can bind, does bind; a capacity configuration whose limit never
  binds on any probe input is not confirmed; a capacity, or a module that names one, is also probed on
  long inputs, `Prober.capacity_checks`), inputs shaped like the module expects
  (``[B, S, d]``, else ``[T, d]``), in the module's dtype/device;
- both training and eval mode; each eager run is one `moec.frontend.probe_harness.run` (a copy of
  the input, flags and buffers restored, a seeded fork of the RNG, so a noisy router's
  ``randn_like`` and the reference's ``torch.randn([T, E], dtype=noise_dtype)`` draw the same noise);
- y (shape of the input), and the second output: router logits ``[T, E]`` or the aux loss;
- tolerance: the harness's (`rtol`: 1e-4 for fp32, 2e-2 for fp16/bf16). In fp16/bf16 the router's
  logits are rounded, so a token whose k-th and (k+1)-th selection scores lie within that rounding
  may pick a different expert; such tokens (only those) are left out of the y comparison.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import torch
from torch import nn

from .. import reference
from ..spec import MoESpec, MoEWeights, RouterConfig
from .outputs import derive, kinds_of, leads, slots
from .probe_harness import draw, first, mismatch, near_tie, run_watched, seeded, tie_rtol
from .token_table import TokenIds, mirrored, probe_tokens, scrambled

_NAMES = {"logits": "router logits", "weights": "routing weights", "aux": "aux loss", "zloss": "z-loss",
          "ids": "expert ids", "counts": "expert counts"}
TOKENS = (1, 5, 48, 48)
MAX_PROBE_TOKENS = 8192     # the longest input a capacity that binds only on long inputs is probed with
LONG = 81                   # tokens per sequence of the long inputs a capacity is probed on
SKEWED = 3          # input 3: tokens pushed towards expert 0
_SHAPES_3D = ((1, 1), (1, 5), (2, 24), (2, 24))


def near_ties(logits: torch.Tensor, cfg: RouterConfig, score_bias, dtype) -> torch.Tensor:
    """Tokens whose top-k (or top groups) could flip under the input dtype's rounding. None in fp32:
    there eager and reference compute the logits alike, and leaving tokens out would weaken the probe."""
    T, E = logits.shape
    if tie_rtol(dtype) <= 1e-5 or T == 0 or cfg.token_table:       # (a token table's choices are given)
        return torch.zeros(T, dtype=torch.bool, device=logits.device)
    logits = logits.float()
    if cfg.order == "topk_then_score":
        keys = logits
    else:
        keys = reference.selection_keys(reference.scores_of(logits, cfg), cfg, score_bias, logits)
    out = torch.zeros(T, dtype=torch.bool, device=logits.device)
    spread = keys.masked_fill(~torch.isfinite(keys), 0).abs().amax(-1) + 1e-6
    if cfg.top_k < E:
        out |= near_tie(keys, cfg.top_k, dtype, spread)
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.order != "topk_then_score":
        sel = logits if cfg.order == "logits_then_score" else reference.scores_of(logits, cfg)
        sel = sel + score_bias.float() if score_bias is not None else sel
        g = sel.view(T, cfg.n_group, E // cfg.n_group)
        gs = g.amax(-1) if cfg.group_score == "max" else torch.sort(g, -1, descending=True).values[..., :2].sum(-1)
        out |= near_tie(gs, cfg.topk_group, dtype, spread)
    return out


class Prober:
    """The module's eager outputs on the probe inputs, computed once and cached."""

    def __init__(self, module: nn.Module, d: int, E: int, dtype: torch.dtype, device: torch.device):
        self.module, self.d, self.E, self.dtype, self.device = module, d, E, dtype, device
        self.rank3 = True
        self.options: list = []          # what the forward's items may be (`moec.frontend.outputs`)
        self.container = None           # tuple, list or a namedtuple class; None: y alone
        self.out_dtypes: tuple = ()
        self.out_leads: tuple = ()          # per item: whether it keeps the input's leading dims
        self.y_flat = False                 # y comes back as [T, d] for a [B, S, d] input
        self.skew: Optional[torch.Tensor] = None
        self.extra: dict = {}               # further inputs: index -> (B, S)
        self.capacity_named = False         # the module names a capacity: a capacity-free lift is checked long
        self.scaled: dict = {}              # input index -> (the input it scales, the factor)
        self._cache: dict = {}
        self.effects: dict = {}          # (input, training, rank3) -> what the forward did besides returning
        self._x: dict = {}
        self.post: Optional[nn.Module] = None     # a norm the forward applies to the combined output
        self.post_path: Optional[str] = None
        self.tokens: Optional[TokenIds] = None     # routing by token id: the forward's ids argument, the table
        self.table: Optional[torch.Tensor] = None  # the random table the eager runs see (`token_table.scrambled`)
        self._tokens_given: Optional[tuple] = None  # (tag, table, token ids) in place of those (`token_checks`)

    def set_skew(self, w_router: torch.Tensor) -> None:
        """Input `SKEWED` leans on router row 0: ``x = 0.5 n + 4 w0 / |w0|^2`` (logit 0 is about 4)."""
        w0 = w_router.detach()[0].float().cpu()
        self.skew = 4 * w0 / w0.pow(2).sum().clamp_min(1e-12)
        self._x = {k: v for k, v in self._x.items() if k[0] < SKEWED}
        self._cache = {k: v for k, v in self._cache.items() if k[0] < SKEWED}

    def shape(self, i: int) -> tuple:
        """``(B, S)`` of input i: the probe's inputs, then those `add_input` and `add_scaled` made."""
        if i in self.scaled:
            return self.shape(self.scaled[i][0])
        return _SHAPES_3D[i] if i < len(_SHAPES_3D) else self.extra[i]

    def add_input(self, B: int, S: int) -> int:
        """A further input of B sequences of S tokens leaning on router row 0 (as `SKEWED`); its index."""
        got = next((i for i, shape in self.extra.items() if shape == (B, S)), None)
        if got is None:
            got = len(_SHAPES_3D) + len(self.extra)
            self.extra[got] = (B, S)
        return got

    def group(self, i: int) -> Optional[int]:
        """Tokens per sequence of input i (None for a ``[T, d]`` input: one sequence)."""
        return self.shape(i)[1] if self.rank3 else None

    def add_scaled(self, base: int, factor: float) -> int:
        """A further input: input ``base`` times ``factor``; its index."""
        got = next((i for i, v in self.scaled.items() if v == (base, factor)), None)
        if got is None:
            got = len(_SHAPES_3D) + len(self.extra) + len(self.scaled)
            self.scaled[got] = (base, factor)
        return got

    def x(self, i: int) -> torch.Tensor:
        key = (i, self.rank3)
        if i in self.scaled and key not in self._x:
            base, factor = self.scaled[i]
            self._x[key] = (self.x(base).float() * factor).to(self.dtype)
        if key not in self._x:
            B, S = self.shape(i)
            x = draw((B * S, self.d), 1000 + i)
            if i >= SKEWED and self.skew is not None:
                x = 0.5 * x + self.skew
            shape = (B, S, self.d) if self.rank3 else (B * S, self.d)
            self._x[key] = x.reshape(shape).to(dtype=self.dtype, device=self.device)
        return self._x[key]

    def token_ids(self, i: int) -> Optional[torch.Tensor]:
        """Input i's random token ids (its leading dims), for a layer that routes by token id; else None."""
        if self.tokens is None:
            return None
        if self._tokens_given is not None:
            return self._tokens_given[2].reshape(self.x(i).shape[:-1])
        return probe_tokens(tuple(self.x(i).shape[:-1]), self.tokens.vocab, 3000 + i, self.device)

    def _table(self) -> torch.Tensor:
        return self._tokens_given[1] if self._tokens_given is not None else self.table

    def choices(self, i: int) -> Optional[torch.Tensor]:
        """Input i's choices under the probe's table (`token_ids`), for a layer that routes by token id."""
        if self.tokens is None:
            return None
        table = self._table()
        return reference.table_choices(table.view(table.shape[0], -1), self.token_ids(i))

    def with_table(self, w: MoEWeights) -> MoEWeights:
        """``w`` reading the probe's table (the one the eager runs see), for a layer that routes by token id."""
        if self.tokens is None:
            return w
        table = self._table()
        return dataclasses.replace(w, token_table=table.view(table.shape[0], -1))

    def setup(self) -> Optional[str]:
        """Find the input rank the forward accepts and what it returns; a reason on failure."""
        errors = []
        for rank3 in (True, False):
            self.rank3 = rank3
            self._cache.clear()
            try:
                y, extras, container = self.eager(1, self.module.training, raw=True)
            except Exception as e:  # noqa: BLE001
                errors.append(f"{'[B, S, d]' if rank3 else '[T, d]'} input: {type(e).__name__}: {e}")
                continue
            return self._classify(y, extras, container)
        return "forward fails on random inputs: " + "; ".join(errors)

    def _classify(self, y, extras, container) -> Optional[str]:
        x = self.x(1)
        T = x.numel() // self.d
        self.y_flat = isinstance(y, torch.Tensor) and x.dim() > 2 and tuple(y.shape) == (T, self.d)
        if not isinstance(y, torch.Tensor) or (y.shape != x.shape and not self.y_flat):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            return (f"forward returns {got} for an input of shape {tuple(x.shape)} (expected the input's shape, or "
                    f"[T, d])")
        self.container = container
        if container is None:
            self.options, self.out_dtypes, self.out_leads = ["y"], (self._y_dtype(y),), ()
            return None
        lead = tuple(x.shape[:-1])
        kinds = [kinds_of(e, T, self.E, lead) for e in extras]
        for i, (e, k) in enumerate(zip(extras, kinds)):
            if not k:
                what = f"a {e.dtype} tensor of shape {list(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
                return (f"forward returns {what} as item {i + 1}, which is none of router logits [T, E], routing "
                        f"weights or expert ids [T, k], a scalar aux loss or z-loss, expert counts [E] or None")
        combos = [c for c in itertools.product(*kinds) if len({k for k in c if k != "none"}) == len([k for k in c if k != "none"])]
        self.options = ["_".join(("y",) + c) for c in combos[:8]]
        if not self.options:
            return "forward returns the same kind of item twice"
        self.out_dtypes = (self._y_dtype(y),) + tuple(None if e is None else "x" if e.dtype == x.dtype else e.dtype
                                                      for e in extras)
        self.out_leads = (False,) + tuple(leads(e, lead) for e in extras)
        return None

    def _y_dtype(self, y: torch.Tensor):
        """y's dtype rule: the input's, or the one the forward returns (a sum promoted by an fp32 part)."""
        return "x" if y.dtype == self.x(1).dtype else y.dtype

    def _key(self, i: int, training: bool) -> tuple:
        """The cache key of input i's eager run (with the ids and table `token_checks` gives, when it gives them)."""
        return (i, training, self.rank3) + ((self._tokens_given[0],) if self._tokens_given is not None else ())

    def eager(self, i: int, training: bool, raw: bool = False):
        """``(y, extras)`` of the module's forward on input i (cached); in training mode under a seeded RNG."""
        key = self._key(i, training)
        if key not in self._cache:
            kwargs = {self.tokens.arg: self.token_ids(i)} if self.tokens is not None else {}
            with scrambled(self.module, self.tokens, self._table() if self.tokens is not None else None):
                out, effects = run_watched(lambda *a: self.module(*a, **kwargs), (self.x(i),), self.module, training,
                                           self.device, probe_seed(i))
            self.effects[key] = effects
            if isinstance(out, (tuple, list)) and len(out) >= 1:
                y, extras, container = out[0], list(out[1:]), type(out)
            else:
                y, extras, container = out, [], None
            self._cache[key] = (y, extras, container)
        y, extras, container = self._cache[key]
        return (y, extras, container) if raw else (y.reshape(-1, self.d), extras)

    def noise(self, i: int, dtype: Optional[torch.dtype]) -> torch.Tensor:
        """The noise eager's ``randn_like`` drew on input i in training mode."""
        T = self.x(i).numel() // self.d
        with seeded(self.device, probe_seed(i)):
            return torch.randn(T, self.E, dtype=dtype or self.dtype, device=self.device)

    def compare(self, i: int, training: bool, spec: MoESpec, w: MoEWeights, outputs: str,
                noise_dtype: Optional[torch.dtype], y_ref=None, aux=None) -> Optional[str]:
        """Compare eager with the reference on input i; ``y_ref``/``aux`` may be precomputed. A forward (or an
        external router) that raises on the input is a mismatch in that mode, named."""
        try:
            return self._compare(i, training, spec, w, outputs, noise_dtype, y_ref, aux)
        except Exception as e:  # noqa: BLE001 - eager code that fails on a probe input: that mode is unconfirmed
            T = self.x(i).numel() // self.d
            return f"T={T}, {mode_name(training)} mode: the forward raises {type(e).__name__}: {e}"

    def _compare(self, i: int, training: bool, spec: MoESpec, w: MoEWeights, outputs: str,
                 noise_dtype: Optional[torch.dtype], y_ref, aux) -> Optional[str]:
        x = self.x(i).reshape(-1, self.d)
        T = x.shape[0]
        y, extras = self.eager(i, training)
        where = f"T={x.shape[0]}, {'training' if training else 'eval'} mode"
        key = self._key(i, training)
        if self.effects[key]:
            return f"{where}: the forward {self.effects[key]}"
        shape = tuple(self.eager(i, training, raw=True)[0].shape)     # y as the forward returns it, every input
        want = (T, self.d) if self.y_flat else tuple(self.x(i).shape)
        if shape != want:
            return f"{where}: the forward returns y of shape {shape} for an input of shape {tuple(self.x(i).shape)}"
        cfg = spec.router
        noise = self.noise(i, noise_dtype) if (training and cfg.noisy) else None
        if w.router is not None or w.shared is not None:    # external children, called as this input's eager run is
            w = dataclasses.replace(w, **{k: getattr(w, k).at(training, probe_seed(i), tuple(self.x(i).shape))
                                          for k in ("router", "shared") if getattr(w, k) is not None})
        logits = reference.logits_of(x, w, noise)
        if w.router is not None:            # (an external router runs once: the reference routes its logits)
            w = dataclasses.replace(w, router=lambda _: logits)
        w, tokens = self.with_table(w), self.token_ids(i)
        choices = reference.table_choices(w.token_table, tokens) if cfg.token_table else None
        if y_ref is None:
            y_ref, aux = reference.moe(x, w, spec, noise, self.group(i), tokens)
        if self.post is not None:                 # the output norm, on the reference's output
            y_ref = self.post.forward(y_ref)
        keep = ~near_ties(logits, cfg, w.score_bias, self.dtype)
        msg = mismatch(y, y_ref, self.dtype, keep)
        if msg:
            return f"{where}: output {msg}"
        kinds = slots(outputs)[1:]
        if len(extras) != len(kinds):
            return f"{where}: the forward returns {len(extras)} items besides y, not {len(kinds)}"
        for kind, got in zip(kinds, extras):
            if kind == "none":
                if got is not None:
                    return f"{where}: an item that was None is now {type(got).__name__}"
                continue
            if kind == "aux":
                if aux is None:
                    return f"{where}: the module returns an aux loss but the spec computes none"
                want = aux
            elif kind == "logits":
                want = logits
            elif kind == "weights":
                if got.shape[-1] != cfg.top_k:
                    return f"{where}: the module returns {got.shape[-1]} routing weights per token, top_k is {cfg.top_k}"
                want = reference.route(logits, cfg, w.score_bias, self.group(i), choices)[1]
            else:
                if cfg.noisy or cfg.token_table:
                    return f"{where}: {kind} of a {'noisy' if cfg.noisy else 'token-table'} router are not derived"
                want = derive(kind, logits, cfg, w.score_bias, self.group(i))
            if not isinstance(got, torch.Tensor) or got.shape != want.shape and got.numel() != want.numel():
                return f"{where}: {_NAMES[kind]} of shape {list(getattr(got, 'shape', []))}, expected {list(want.shape)}"
            if kind in ("ids", "counts"):
                if not torch.equal(got.reshape(want.shape).long(), want.long()):
                    return f"{where}: {_NAMES[kind]} differ"
                continue
            rows = keep if kind == "weights" else None
            msg = mismatch(got.reshape(want.shape), want.to(x.dtype) if kind in ("logits", "weights") else want,
                           self.dtype, rows)
            if msg:
                return f"{where}: {_NAMES[kind]} {msg}"
        return None

    def match(self, i: int, training: bool, spec: MoESpec, w: MoEWeights, noise_dtype, y_ref=None, aux=None):
        """``(outputs, None)`` for the first of the forward's possible `options` that agrees with the
        reference on input i, else ``(first option, why not)``."""
        first = None
        for outputs in self.options:
            msg = self.compare(i, training, spec, w, outputs, noise_dtype, y_ref=y_ref, aux=aux)
            if msg is None:
                return outputs, None
            first = first or msg
        return self.options[0], first

    def check(self, lifted, training: Optional[bool] = None) -> Optional[str]:
        """The full probe of a `LiftedMoE`: every input, in ``training`` mode (None: both modes)."""
        if lifted.outputs not in self.options:
            return f"forward returns one of {self.options} but the lifted layer says {lifted.outputs!r}"
        current = self.module.training
        modes = (current, not current) if training is None else (training,)
        with torch.no_grad():
            w = lifted.read_weights(self.module, self.module.training)
            if self.skew is None and w.w_router is not None:    # (an external router's inputs are not skewed)
                self.set_skew(w.w_router)
            runs = (self.compare(i, t, lifted.spec, w, lifted.outputs, lifted.noise_dtype)
                    for t in modes for i in range(len(TOKENS)))
            return first(runs) or self.capacity_checks(lifted, w, modes) or self.norm_checks(lifted, w, modes) or \
                self.token_checks(lifted, w, modes)

    def token_checks(self, lifted, w: MoEWeights, modes) -> Optional[str]:
        """Routing by token id: the compiled layer looks the ids up as ``table[ids]`` does, so the layer is also
        probed where a lookup's rules show: ids below 0 (rows from the end), ids past the vocabulary (a lookup
        raises: so must the forward), and, under a table whose rows ``v`` and ``V - 1 - v`` are equal, both ids
        of such pairs (a forward that reads the ids other than through the table answers differently)."""
        if not lifted.spec.router.token_table:
            return None
        V, base = self.tokens.vocab, self.token_ids(2).reshape(-1)
        cases = (("below", self.table, base - V), ("past", self.table, base + V),
                 ("mirror", mirrored(self.table), base), ("mirrored", mirrored(self.table), V - 1 - base))
        for tag, table, tokens in cases:
            self._tokens_given = (tag, table, tokens)
            try:
                if tag == "past":           # a lookup raises: the forward must too
                    for t in modes:
                        try:
                            self.eager(2, t)
                        except Exception:  # noqa: BLE001 - the lookup's error, as the compiled layer's
                            continue
                        return f"{mode_name(t)} mode: the forward answers for token ids past its table's {V} rows"
                    continue
                msg = first(self.compare(2, t, lifted.spec, w, lifted.outputs, lifted.noise_dtype) for t in modes)
                if msg:
                    return f"token ids {'below 0' if tag == 'below' else 'read other than through the table'}: {msg}"
            finally:
                self._tokens_given = None
        return None

    def norm_checks(self, lifted, w: MoEWeights, modes) -> Optional[str]:
        """Expert norms: their eps shows only where an expert's output is about as small as it, so a layer with
        them is also probed on inputs scaled down by 10, 100 and 1000 (a wrong eps answers otherwise there)."""
        if lifted.spec.expert_norm is None:
            return None
        scaled = [self.add_scaled(2, f) for f in (1e-1, 1e-2, 1e-3)]
        return first(self.compare(i, t, lifted.spec, w, lifted.outputs, lifted.noise_dtype) for t in modes
                     for i in scaled)

    def capacity_checks(self, lifted, w: MoEWeights, modes) -> Optional[str]:
        """A layer with an expert capacity, or whose module names one (``capacity_named``), is also probed on
        two long inputs leaning on one expert, ``[2, S]`` and ``[S, 2]`` with S past where the capacity binds
        (a fixed capacity of 64) and at least `LONG` tokens (past a group of 64 tokens, where a floor and a
        ceiling differ, whichever dim is the sequence), so its rules are confirmed where it binds; and a
        capacity must bind on some input, else it is unconfirmed."""
        cfg = lifted.spec.router
        if not cfg.has_capacity and not self.capacity_named:
            return None
        S = max(_binding_length(cfg) or 0, LONG) if cfg.has_capacity else LONG
        if 2 * S > MAX_PROBE_TOKENS:
            return (f"the expert capacity ({cfg.capacity(S)} pairs) binds only past {S} tokens per sequence, "
                    f"more than the probe runs ({MAX_PROBE_TOKENS // 2})")
        longer = [self.add_input(2, S), self.add_input(S, 2)]
        msg = first(self.compare(i, t, lifted.spec, w, lifted.outputs, lifted.noise_dtype) for t in modes for i in longer)
        if msg or not cfg.has_capacity:
            return msg
        for i in [*range(len(TOKENS)), *longer]:
            x = self.x(i).reshape(-1, self.d)
            logits = reference.logits_of(x, w)
            if not torch.equal(reference.route(logits, cfg, w.score_bias, self.group(i))[0],
                               reference.route(logits, cfg.without_capacity(), w.score_bias)[0]):
                return None
        what = f"capacity_factor={cfg.capacity_factor}" if cfg.capacity_factor is not None else \
            f"expert_capacity={cfg.expert_capacity}"
        return f"{what} never binds on the probe inputs, so the probe cannot tell it from no capacity"


def probe_seed(i: int) -> int:
    """The RNG seed of the probe's runs on input i (eager's, and the reference's noise and external router)."""
    return 2000 + i


def _binding_length(cfg: RouterConfig) -> Optional[int]:
    """Tokens per sequence at which ``cfg``'s capacity can be exceeded (None: never)."""
    S = max(cfg.expert_capacity or 0, cfg.min_capacity) + 9
    for _ in range(6):
        if cfg.capacity(cfg.group_tokens(S, S)) < S:
            return S
        S *= 2
    return None


def probe(module: nn.Module, lifted, training: Optional[bool] = None) -> Optional[str]:
    """Run ``module``'s eager forward and `moec.reference.moe` on random inputs, in ``training`` mode
    (None: both modes); None if they agree."""
    try:
        with torch.no_grad():
            ref = lifted.weights(lifted.param_tensors(module)).w_up   # inputs take the experts' dtype
        pr = Prober(module, lifted.spec.hidden, lifted.spec.num_experts, ref.dtype, ref.device)
        msg = pr.setup() or pr.check(lifted, training)
        if msg is None and not lifted.out_dtypes:         # an adapter's lift: packed as the forward packs
            lifted.container, lifted.out_dtypes, lifted.out_leads = pr.container, pr.out_dtypes, pr.out_leads
        if msg is None:
            lifted.y_flat = pr.y_flat
        return msg
    except Exception as e:  # noqa: BLE001 - a probe that crashes is a failed probe
        return f"probe failed: {type(e).__name__}: {e}"


def mode_name(training: bool) -> str:
    return "training" if training else "eval"
