"""moec: a compiler for sparse Mixture-of-Experts layers.

    import moec
    model = moec.compile(model)      # lifts MoE layers into moec IR, runs generated Triton kernels
    print(model.explain())           # what was lifted, what stayed eager, and why
    moec.tune(model, x)              # optional, on a GPU: time tile candidates, keep the winners

See docs/architecture.md for the pipeline and examples/ for runnable scripts.
"""
from . import ops
from .api import compile, tune
from .region import disabled
from .spec import MoESpec, MoESpecError, MoEWeights, RouterConfig, SharedExpertConfig

__version__ = "0.3.0"
__all__ = ["compile", "tune", "disabled", "ops", "MoESpec", "MoESpecError", "MoEWeights", "RouterConfig",
           "SharedExpertConfig"]
