"""`moec.compile`: find the MoE layers of a module, lift them, and run them as generated kernels.

Compilation is in place: each lifted submodule's class is swapped for a subclass whose forward
runs the region (keeping its parameters, buffers, state_dict, hooks, `.to()`, `.eval()`); the
root also gains `explain()`. Everything moec does not lift runs as the user's eager code.
"""
from __future__ import annotations

import functools
import os
import sys
import types
import warnings
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import env, guards, hf, traced
from .autotune import tune_model
from .explain import entries, report
from .log import logger
from .frontend import LiftedMoE, NotLifted, find_moe_modules, lift, unread_moe_modules
from .frontend.call_shape import is_attention
from .frontend.moba_candidates import find_moba_modules
from .frontend.unread import product_key_layer
from .hf import attention_functions, block_experts
from .moba_region import MobaRegion
from .moe_region import MoERegion
from .region import activations_policy, being_traced, check_mode

_SUBCLASSES: dict[type, type] = {}
_log = logger("lift")


# torch's lazy form of torch.compiler.disable: dynamo is imported only when something compiles
_opaque = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


def _compiled_forward(self, *args, **kwargs):
    """The forward of a compiled module: its region (kernels, or the eager forward and why). Under
    `torch.compile` an MoE layer is one custom op (`moec.traced`); a MoBA core is an opaque call."""
    if torch.compiler.is_compiling() and not _exporting() and not traced.planning:
        return _for_dynamo(self, *args, **kwargs)
    return _run(self, *args, **kwargs)


def _exporting() -> bool:
    return torch.compiler.is_exporting() if hasattr(torch.compiler, "is_exporting") else False


def _for_dynamo(self, *args, **kwargs):
    region = getattr(self, "_moec_region", None)
    base = self._moec_base
    # the root, an eager block's experts: dynamo traces their own forward
    if region is None or isinstance(region, block_experts.BlockExperts):
        return base.forward(self, *args, **kwargs)
    if isinstance(region, MoERegion) and len(args) + len(kwargs) == 1:
        x = args[0] if args else next(iter(kwargs.values()))
        if isinstance(x, torch.Tensor):
            return traced.forward_for_dynamo(self, x, functools.partial(base.forward, self))
    return _opaque_run(self, *args, **kwargs)


def _run(self, *args, **kwargs):
    region = self.__dict__.get("_moec_region")
    base = self._moec_base
    eager = functools.partial(base.forward, self)
    if region is None:
        return eager(*args, **kwargs)
    if being_traced() and not traced.planning:
        return region.eager("traced (torch.export, torch.fx or torch.jit trace the eager forward)", eager,
                            *args, **kwargs)
    if getattr(region, "takes_any_call", False):    # a MoBA or experts region binds the call itself
        return region(self, eager, *args, **kwargs)
    if not args and len(kwargs) == 1:      # forward(hidden_states=x)
        args, kwargs = tuple(kwargs.values()), {}
    if not args:
        return eager(*args, **kwargs)
    return region(self, eager, *args, **kwargs)


_opaque_run = _opaque(_run)


def _explain(self) -> str:
    """A readable report: which regions were lifted into moec IR, which were not, and why."""
    return report(self)


def _serve(module: nn.Module, region) -> None:
    """Make ``module``'s forward call ``region`` (its class swapped for the compiled subclass)."""
    module.__class__ = _compiled_class(type(module))
    module.__dict__["_moec_region"] = region


def _compiled_class(cls: type) -> type:
    if getattr(cls, "_moec_base", None) is not None and cls in _SUBCLASSES.values():
        return cls
    if cls not in _SUBCLASSES:
        # forward keeps the original's signature (libraries inspect it: transformers' generate()
        # checks which arguments a model's forward takes)
        forward = functools.wraps(cls.forward)(_own_forward(cls))
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
            "forward": forward, "explain": _explain, "_moec_base": cls, "__reduce_ex__": _reduce_ex,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__})
    return _SUBCLASSES[cls]


def _forward(self, *args, **kwargs):
    return _compiled_forward(self, *args, **kwargs)


def _own_forward(cls: type):
    """`_forward` with a code object of its own for ``cls``: dynamo keeps its compiled frames and its
    recompile limit per code object, so compiled classes must not share one (as eager ones don't)."""
    names = {"co_name": "forward"}
    if sys.version_info >= (3, 11):
        names["co_qualname"] = f"{cls.__qualname__}.forward"
    code = _forward.__code__.replace(**names)
    return types.FunctionType(code, _forward.__globals__, "forward")


def _reduce_ex(self, protocol):
    """Pickling (torch.save, copy.deepcopy): the module as its own class with its state, moec's
    runtime state left out; the module `moec.compile` was called on is compiled again when loaded
    (its submodules come back as their own classes and are lifted again with it)."""
    state = {k: v for k, v in self.__dict__.items() if not k.startswith("_moec")}
    options = self.__dict__.get("_moec_options") if "_moec_report" in self.__dict__ else None
    return _restore, (type(self)._moec_base, state, options)


def _restore(cls: type, state: dict, options: Optional[dict]) -> nn.Module:
    module = cls.__new__(cls)
    module.__dict__.update(state)
    return compile_module(module, **options) if options is not None else module


def _dump_root(dump_dir) -> Optional[Path]:
    return Path(dump_dir) if dump_dir else env.path("MOEC_DUMP_DIR")


def compile_module(model: nn.Module, *, dump_dir=None, arch: Optional[str] = None,
                   activations: Optional[str] = None, mode: str = "default") -> nn.Module:
    """Compile ``model`` in place (see `compile`) and return it."""
    policy = activations_policy(activations)          # a bad value fails here, naming the argument
    check_mode(mode)
    _register_integrations()
    root = _dump_root(dump_dir)
    regions, skipped = [], []
    traced.release_freed()
    found = find_moe_modules(model)
    for qualname, module in found:
        name = qualname or type(module).__name__
        try:
            got = lift(module)
        except Exception as e:  # the frontend must not crash a model eager PyTorch runs
            got = NotLifted(f"{type(module).__name__}: analysis failed: {type(e).__name__}: {e}")
        if isinstance(got, LiftedMoE):
            region = MoERegion(name.replace(".", "_") or "root", arch=arch, dump_dir=root, activations=policy,
                               mode=mode, lifted=got,
                               lift_dtype=got.param_tensors(module)[0].dtype, state=guards.read(module))
            _serve(module, region)
            traced.handle(module)
            regions.append((qualname, type(module).__name__, region))
            _log.info("%s (%s): lifted: %s", qualname or "<root>", type(module).__name__, got.formulation)
        elif isinstance(got, NotLifted):
            skipped.append((qualname, type(module).__name__, got.reason))
            _log.info("%s (%s): stays eager: %s", qualname or "<root>", type(module).__name__, got.reason)
    unread = unread_moe_modules(model, found)
    skipped += [(q, type(m).__name__, why) for q, m, why in unread]
    keyed = [(q, m) for q, m, _ in unread if product_key_layer(m)]      # MoE layers, not MoBA attention
    # the parts of a layer holding experts moec does not read (an MLP router's top-k) are no MoBA either
    parts = [(f"{q}.{n}", c) for q, m, _ in unread for n, c in m.named_children() if not is_attention(n, c)]
    moba = _attach_moba(model, find_moe_modules(model) + keyed + parts, arch, root)
    experts = []
    if sys.modules.get("transformers") is not None:
        moba += attention_functions.attach(model, arch, root)    # MoBA registered as an attention function
        for qualname, module, region in block_experts.attach(model, skipped, arch, root):
            _serve(module, region)          # an eager block's experts on the kernels
            experts.append((qualname, type(module).__name__, region))
    model.__class__ = _compiled_class(type(model))
    model.__dict__["_moec_report"] = {"regions": regions, "skipped": skipped, "root": type(model).__name__,
                                      "moba": moba, "experts": experts}
    model.__dict__["_moec_options"] = {"dump_dir": dump_dir, "arch": arch, "activations": activations, "mode": mode}
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        write = functools.partial(_write_explain, weakref.ref(model), root / "explain.txt")
        for _, _, region in regions + moba + experts:
            region.on_compile = write           # the report grows a line per compiled program
        write()
    return model


def _attach_moba(model: nn.Module, moe: list, arch, root) -> list:
    """A `MobaRegion` on every module whose forward uses ``topk`` outside the MoE candidates; each is
    analysed now when inputs can be made up, else at its first call (`moec.frontend.moba_lift`)."""
    found = []
    for qualname, module in find_moba_modules(model, exclude=[m for _, m in moe]):
        region = MobaRegion((qualname.replace(".", "_") or "root") + "_moba", arch=arch, dump_dir=root)
        region.analyse_at_compile(module)
        _serve(module, region)
        found.append((qualname, type(module).__name__, region))
    return found


def _register_integrations() -> None:
    """When transformers is imported, make ``experts_implementation="moec"`` available (`moec.hf`)."""
    if sys.modules.get("transformers") is not None:
        hf.register()


def _write_explain(model_ref, path: Path) -> None:
    model = model_ref()
    if model is not None:
        path.write_text(report(model) + "\n")


def _compile_class(cls: type, **options) -> type:
    class Compiled(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if type(self) is Compiled:
                compile_module(self, **options)

    Compiled.__name__ = cls.__name__
    Compiled.__qualname__ = cls.__qualname__
    Compiled.__module__ = cls.__module__
    Compiled.__doc__ = cls.__doc__
    return Compiled


def _referenced_modules(fn: Callable) -> list[nn.Module]:
    """Modules a function reaches by name: its closure cells and the globals its code reads."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return []
    found = [c.cell_contents for c in (fn.__closure__ or ()) if _cell_module(c)]
    found += [fn.__globals__[n] for n in code.co_names if isinstance(fn.__globals__.get(n), nn.Module)]
    return found


def _cell_module(cell) -> bool:
    try:
        return isinstance(cell.cell_contents, nn.Module)
    except ValueError:          # an empty cell
        return False


def _compile_function(fn: Callable, **options) -> Callable:
    """A function: the modules it references (closure, globals) and every `nn.Module` passed to it
    are compiled (once, in place) before the call; the function's own code runs as written."""
    seen: dict[int, nn.Module] = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for a in _referenced_modules(fn) + list(args) + list(kwargs.values()):
            if isinstance(a, nn.Module) and id(a) not in seen:
                seen[id(a)] = compile_module(a, **options)
        return fn(*args, **kwargs)

    def explain() -> str:
        if not seen:
            return (f"moec report for function {fn.__name__}: it has not been called yet, or it reaches "
                    "no module; its body runs as eager PyTorch (call moec.ops.moe inside it, or use "
                    "an MoE module from it, to use moec's kernels)")
        lines = [f"moec report for function {fn.__name__}"]
        for m in seen.values():
            info = m.__dict__["_moec_report"]
            lines += [f"  module {info['root']}:"] + [f"    {line}" for line in entries(info)]
        return "\n".join(lines + ["  everything else runs as eager PyTorch"])

    wrapper.explain = explain
    return wrapper


_DISABLED_SAID = []


def _say_disabled() -> None:
    if not _DISABLED_SAID:
        _DISABLED_SAID.append(True)
        warnings.warn("moec: MOEC_DISABLE=1: moec.compile returns models unchanged (their eager code runs)",
                      stacklevel=3)


def compile(obj=None, *, dump_dir: str | os.PathLike | None = None, arch: Optional[str] = None,
            activations: Optional[str] = None, mode: str = "default"):
    """Compile the MoE layers of a module, module class or function into generated Triton kernels.

    Usable as ``@moec.compile``, ``@moec.compile(dump_dir=..., arch=...)`` on an ``nn.Module``
    class, or ``moec.compile(model)`` on an instance (compiled in place and returned) or a
    function (the modules it uses, by closure, global or argument, are compiled). ``dump_dir`` (or env ``MOEC_DUMP_DIR``) receives
    the captured region, the IR after each pass, every kernel, tiles and launches. ``arch``
    (``"sm80"``, ``"sm90"``, ...) overrides the tile table's target; by default the device decides.
    ``activations`` (training): what an MoE layer's forward keeps for its backward: ``"save"`` the
    gate/up products (no GEMM recomputed), ``"recompute"`` nothing beyond the routing (the backward
    recomputes them: two grouped GEMMs more), ``"auto"`` (default, or env ``MOEC_ACTIVATIONS``) the
    cheaper in time on the target; either way less than eager autograd keeps. ``explain()`` says which.
    ``mode="reduce-overhead"`` (as torch.compile's): on a GPU each MoE layer's inference calls replay a
    CUDA graph captured per token count (decode: one graph launch instead of a launch per kernel); its
    outputs are fresh tensors, writes into the weights are seen, a replaced weight is captured again.

    Example::

        model = moec.compile(MyMoEBlock(d=64, f=128, E=8, k=2))
        y = model(x)                 # fused kernels (the Triton interpreter on a CPU)
        print(model.explain())
    """
    options = {"dump_dir": dump_dir, "arch": arch, "activations": activations, "mode": mode}
    if obj is None:
        return lambda o: compile(o, **options)
    if env.flag("MOEC_DISABLE"):
        _say_disabled()
        return obj
    activations_policy(activations)
    check_mode(mode)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return _compile_class(obj, **options)
    if isinstance(obj, nn.Module):
        return compile_module(obj, **options)
    if callable(obj):
        return _compile_function(obj, **options)
    raise TypeError(f"moec.compile takes an nn.Module, an nn.Module class or a function, got {type(obj).__name__}")


def tune(model: nn.Module, example_input=None, **options) -> dict:
    """Autotune the kernels of every MoE layer `compile` lifted in ``model``, on this GPU, and keep
    the winners in the tune file (`moec.runtime.tune_file`: per device, kernel and token-count
    bucket; ``MOEC_TUNE_FILE`` picks the file, which can be shipped with the model).

    ``example_input`` (a tensor, a tuple of positional arguments or a dict of keyword arguments for
    ``model``) is run once first, without gradients, so each layer it reaches compiles for the dtype
    and device it really runs in; a layer is tuned for every dtype and arch it has been called
    with, else for its parameters' dtype and device. Identical layers share a program and are tuned
    once. Afterwards every compiled layer recompiles (once, at its next call) with the tuned tiles:
    nothing keeps stale tiles, and ``explain()`` says which tiles came from the tune file.

    ``options`` go to `moec.autotune.tune`: ``candidates`` (cost-model candidates timed besides the
    current tile), ``buckets``, ``progress`` (``line -> None``, default print: a line per timed
    candidate with kernel i/n, bucket, candidate j/m and elapsed time), ``path``; and, without a GPU
    (tests, examples/autotune.py), ``timer``, ``device`` and ``sizes``. Programs of the CPU
    interpreter (arch ``cpu``) have fixed tiles and are skipped: compile with ``arch="sm90"`` to tune
    a GPU arch's tiles elsewhere. Returns ``{kernel key: {bucket: entry}}`` of all tuned.

    Example (on a GPU)::

        model = moec.compile(model)
        moec.tune(model, torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16))
        y = model(x)                 # tuned tiles; later processes read them from the file
    """
    return tune_model(model, example_input, **options)
