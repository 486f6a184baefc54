"""moec's frontend: recognise MoE layers in eager PyTorch modules and read off their MoESpec.

    lifted = lift(module)        # LiftedMoE | NotLifted(reason) | None (nothing MoE-like)
    probe(module, lifted)        # None when eager forward == moec.reference.moe on random inputs
    find_moe_modules(model)      # [(qualified name, module)] MoE-like candidates
    unread_moe_modules(model, found)  # [(name, module, reason)] modules with experts that are no candidate
    register_adapter(name, prefix)(build)   # a lifting rule for a class the generic reader cannot read

How a module is read (why fx alone is not enough) is explained in `moec.frontend.trace`; both
recognisers (the MoE lifter and the MoBA matcher) read graphs with one vocabulary
(`moec.frontend.fx_ops`) and are confirmed by one probe harness (`moec.frontend.probe_harness`).
"""
from .adapters import adapter_for, register_adapter
from .lift import find_moe_modules, lift, unread_moe_modules
from .lifted import LiftedMoE, NotLifted
from .probe import probe

__all__ = ["lift", "probe", "find_moe_modules", "unread_moe_modules", "LiftedMoE", "NotLifted", "register_adapter", "adapter_for"]
