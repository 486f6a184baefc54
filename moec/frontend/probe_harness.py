"""The probe harness: how the frontend runs a module's own eager code to confirm what it recognised.

Matching by structure proposes; running confirms. Both probes (`moec.frontend.probe` for MoE layers,
`moec.frontend.moba_probe` for MoBA cores) and the expert check in `moec.frontend.experts` run eager
code here, on made-up inputs, and judge it against moec's reference semantics:

- inputs are drawn from a seeded generator (`draw`), so a probe is reproducible, and eager code
  gets *copies* (`run`): a forward that writes into its input (``x.mul_(2)``) cannot change the
  values the reference is computed from, so it cannot fool the probe;
- each run sets every training flag as asked and restores the flags and the buffers afterwards
  (`mode`), and draws its randomness from a seeded fork of the RNG (`seeded`), so a noisy forward
  and its reference can draw the same noise while the caller's RNG stays untouched;
- tolerance depends on the dtype (`rtol`): max |actual - expected| <= rtol * max |expected|;
- near ties (`near_tie`): where the k-th and (k+1)-th largest selection scores lie within the dtype's
  rounding (`tie_rtol`), eager and reference may legitimately select differently, so the callers
  leave those rows out of the comparison;
- every check answers a reason string, or None when it agrees (`first` takes the first reason).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.utils._pytree import tree_map


def rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of a comparison of outputs computed in ``dtype``."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def tie_rtol(dtype: torch.dtype) -> float:
    """Relative margin under which two selection scores computed in ``dtype`` may swap order."""
    return 1e-5 if dtype in (torch.float32, torch.float64) else (1e-2 if dtype == torch.float16 else 3e-2)


def mismatch(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
             keep: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when ``actual`` matches ``expected`` within the dtype's tolerance (rows in ``keep``)."""
    a, b = actual.detach().float(), expected.detach().float()
    if a.shape != b.shape:
        if a.numel() != b.numel():
            return f"shape {tuple(actual.shape)} vs reference {tuple(expected.shape)}"
        a = a.reshape(b.shape)
    scale = float(b.abs().max()) if b.numel() else 0.0
    if keep is not None and a.dim() >= 1 and keep.shape[0] == a.shape[0]:
        a, b = a[keep], b[keep]
    if a.numel() == 0:
        return None
    if not torch.isfinite(a).all() and torch.isfinite(b).all():
        return "non-finite values where the reference is finite"
    err = float((a - b).abs().max())
    tol = rtol(dtype) * max(scale, 1e-6) + 1e-7
    if err <= tol:
        return None
    return f"max abs error {err:.3g} > {tol:.3g} (relative {err / max(scale, 1e-12):.2e})"


def near_tie(keys: torch.Tensor, k: int, dtype: torch.dtype, spread: torch.Tensor) -> torch.Tensor:
    """Rows (all dims but the last) whose k-th and (k+1)-th largest ``keys`` differ by less than
    ``tie_rtol(dtype) * spread``: a top-k of them may differ under ``dtype``'s rounding."""
    s = torch.sort(keys, dim=-1, descending=True).values
    lo, hi = s[..., k - 1], s[..., k]
    return torch.isfinite(hi) & ((lo - hi) < tie_rtol(dtype) * spread)


def first(reasons: Iterable[Optional[str]]) -> Optional[str]:
    """The first reason of ``reasons`` (evaluated lazily), or None when every check agreed."""
    return next((r for r in reasons if r), None)


def draw(shape, generator: Union[torch.Generator, int], dtype: torch.dtype = torch.float32,
         device: Union[torch.device, str] = "cpu") -> torch.Tensor:
    """Standard normal values from ``generator`` (or a CPU generator seeded with it), then cast: the same
    values on every device."""
    g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(generator)
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def copied(tree):
    """``tree`` with every tensor replaced by a copy (what eager code is given)."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


@contextlib.contextmanager
def mode(module: nn.Module, training: bool, changed: Optional[list] = None):
    """Run with every submodule in ``training`` mode; restore flags and buffers afterwards (the names of
    buffers the run wrote or replaced are appended to ``changed``)."""
    flags = [(m, m.training) for m in module.modules()]
    bufs = [(m, n, b, b.detach().clone()) for m in module.modules() for n, b in m._buffers.items() if b is not None]
    try:
        for m, _ in flags:
            m.training = training
        yield
    finally:
        for m, f in flags:
            m.training = f
        with torch.no_grad():
            if changed is not None:
                names = {id(m): p for p, m in module.named_modules()}
                changed += [f"{names.get(id(m), '?')}.{n}".lstrip(".") for m, n, b, saved in bufs
                            if m._buffers.get(n) is not b or not torch.equal(b, saved)]
            for m, n, b, saved in bufs:
                m._buffers[n] = b
                b.copy_(saved)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """Seed the generator of ``device`` inside a forked RNG state (the caller's is restored)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[idx]):
            with torch.cuda.device(idx):
                torch.cuda.manual_seed(seed)
            torch.random.default_generator.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield


def _plain_attributes(module: nn.Module) -> dict:
    plain = (bool, int, float, str, type(None))
    return {(p, k): v for p, m in module.named_modules() for k, v in vars(m).items()
            if k != "training" and isinstance(v, plain)}


@contextlib.contextmanager
def hooks_off(module: nn.Module):
    """Run without the forward hooks and pre-hooks of ``module``'s tree and the global ones: a lift is of
    the module's own code (a compiled layer runs its hooks around the kernels, or runs eager when a
    module inside has some), and users' hooks must not see the probe's made-up inputs."""
    from torch.nn.modules import module as nn_module
    tables = [(m, name) for m in module.modules() for name in ("_forward_hooks", "_forward_pre_hooks")]
    saved = [getattr(m, name) for m, name in tables]
    globals_ = [(nn_module, name) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")]
    saved_globals = [getattr(nn_module, name) for _, name in globals_]
    try:
        for (m, name), table in zip(tables, saved):
            if table:
                object.__setattr__(m, name, type(table)())
        for (owner, name), table in zip(globals_, saved_globals):
            if table:
                setattr(owner, name, type(table)())
        yield
    finally:
        for (m, name), table in zip(tables, saved):
            object.__setattr__(m, name, table)
        for (owner, name), table in zip(globals_, saved_globals):
            setattr(owner, name, table)


def run_watched(fn, args: tuple, module: nn.Module, training: bool, device: torch.device, seed: int):
    """`run`, and what the call did besides returning its output, in words (None: nothing): wrote into its
    input, wrote or replaced a buffer, set a plain attribute. Kernels that replace the forward would do
    none of these, so a mode of the forward that does is not liftable."""
    args = copied(args)
    given = copied(args)
    attrs = _plain_attributes(module)
    buffers: list = []
    with torch.no_grad(), mode(module, training, buffers), seeded(device, seed), hooks_off(module):
        out = fn(*args)
    said = []
    if any(isinstance(a, torch.Tensor) and not torch.equal(a, b) for a, b in zip(args, given)):
        said.append("writes into its input in place")
    if buffers:
        said.append(f"writes to buffer(s) {', '.join(buffers[:3])}")
    now = _plain_attributes(module)
    moved = [key for key in set(attrs) | set(now)
             if attrs.get(key, _UNSET) is not now.get(key, _UNSET) and attrs.get(key, _UNSET) != now.get(key, _UNSET)]
    for path, name in moved:                    # the probe leaves the module as it found it
        m = module.get_submodule(path)
        if (path, name) in attrs:
            setattr(m, name, attrs[path, name])
        else:
            delattr(m, name)
    if moved:
        said.append(f"sets attribute(s) {', '.join(sorted(f'{p}.{k}'.lstrip('.') for p, k in moved)[:3])}")
    return out, ("; ".join(said) or None)


_UNSET = object()


def run(fn, args: tuple, module: nn.Module, training: bool, device: torch.device, seed: int):
    """``fn(*args)`` on copies of ``args``, without autograd, with ``module`` in ``training`` mode (restored
    after, buffers too) and the RNG of ``device`` seeded with ``seed`` (the caller's untouched)."""
    args = copied(args)
    with torch.no_grad(), mode(module, training), seeded(device, seed), hooks_off(module):
        return fn(*args)
