"""moec's IR: typed ops on symbolic shapes, a graph, a text form, a verifier, an interpreter."""
from . import moba_ops as _moba_ops  # noqa: F401  (registers MoBA's ops: block_pool, block_gate, ...)
from . import grad_ops as _grad_ops  # noqa: F401  (registers the backward's ops: grouped_dgrad, ...)
from .build import build_experts_graph, build_moba_graph, build_moe_graph
from .graph import Builder, Graph, Node
from .interp import interpret
from .ops import OPS, IRError, router_attrs, router_config
from .text import parse_graph, print_graph
from .types import T, TensorType
from .verify import verify

__all__ = ["Builder", "Graph", "IRError", "Node", "OPS", "T", "TensorType", "build_experts_graph", "build_moba_graph",
           "build_moe_graph", "interpret", "parse_graph", "print_graph", "router_attrs", "router_config", "verify"]
