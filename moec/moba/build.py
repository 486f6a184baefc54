"""Build the unfused IR graph of a MoBA core from its `MobaConfig`: what the frontend lifts.

    graph moba(%q: f16[B, 8, T, 64], %k: f16[B, 2, T, 64], %v: f16[B, 2, T, 64]) {
      %pooled: f16[B, 2, ceiling(T/64), 64] = block_pool(k=%k) {block_size=64}
      %indices: i32[B, 8, T, 4] = block_gate(q=%q, pooled=%pooled) {block_size=64, top_k=4}
      %out: f16[B, 8, T, 64] = block_sparse_attention(q=%q, k=%k, v=%v, indices=%indices) {block_size=64}
      return %out
    }

Every step the eager code performs is spelled out (mean-pool the key blocks, score and select blocks,
attend); the passes in `moec.passes.moba_pipeline` fuse and tile it. Graph inputs ``q``, ``k``, ``v``
are in ``[B, heads, T, D]`` layout (the region passes strided views of other layouts).
"""
from __future__ import annotations

from dataclasses import dataclass

from moec.ir.graph import Builder, Graph
from moec.ir.types import T, TensorType, dtype_name

from .ir_ops import B


@dataclass(frozen=True)
class MobaConfig:
    """What a lifted MoBA core computes: `moec.moba.reference.moba_reference` with these arguments."""

    block_size: int
    top_k: int               # counts the own block
    heads: int               # query heads H
    kv_heads: int            # key/value heads Hkv (H % Hkv == 0; GQA group H // Hkv)
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("block_size", "top_k", "heads", "kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MobaConfig.{name} must be a positive int, got {v!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def describe(self) -> str:
        gqa = f", GQA group {self.group}" if self.group > 1 else ""
        return (f"block_size={self.block_size}, top_k={self.top_k} (own block included), causal, "
                f"heads {self.heads} / kv heads {self.kv_heads}{gqa}, head_dim {self.head_dim}")


def build_moba_graph(cfg: MobaConfig, dtype, name: str = "moba") -> Graph:
    """The core on ``q: dtype[B, H, T, D]``, ``k``/``v: dtype[B, Hkv, T, D]``; returns ``out``."""
    dt = dtype_name(dtype)
    b = Builder(name)
    q = b.input("q", TensorType(dt, (B, cfg.heads, T, cfg.head_dim)))
    k = b.input("k", TensorType(dt, (B, cfg.kv_heads, T, cfg.head_dim)))
    v = b.input("v", TensorType(dt, (B, cfg.kv_heads, T, cfg.head_dim)))
    bs = {"block_size": cfg.block_size}
    pooled = b.add("block_pool", {"k": k}, bs)["pooled"]
    idx = b.add("block_gate", {"q": q, "pooled": pooled}, {**bs, "top_k": cfg.top_k})["indices"]
    out = b.add("block_sparse_attention", {"q": q, "k": k, "v": v, "indices": idx}, bs)["out"]
    return b.graph([out])
