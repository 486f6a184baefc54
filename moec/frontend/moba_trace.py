"""The MoBA frontend's tracer names, kept importable from here (``moec.moba.region`` imports them).

The shape-specialised tracer, `bind` and `signature` live in `moec.frontend.trace`, shared with the
MoE frontend's partial tracer.
"""
from .trace import Bound, TraceFailed, Traced, bind, signature, trace  # noqa: F401
