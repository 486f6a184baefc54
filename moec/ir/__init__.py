"""moec's IR: typed ops on symbolic shapes, a graph, a text form, a verifier, an interpreter."""
from .build import build_moe_graph
from .graph import Builder, Graph, Node
from .interp import interpret
from .ops import OPS, IRError, router_attrs, router_config
from .text import parse_graph, print_graph
from .types import T, TensorType
from .verify import verify

__all__ = ["Builder", "Graph", "IRError", "Node", "OPS", "T", "TensorType", "build_moe_graph",
           "interpret", "parse_graph", "print_graph", "router_attrs", "router_config", "verify"]

from moec.moba import ir_ops as _moba_ir_ops  # noqa: E402,F401  (registers MoBA's ops: block_pool, block_gate, ...)
