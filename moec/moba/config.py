"""What a MoBA core computes: `MobaConfig`, the arguments of `moec.moba.reference.moba_reference`
that a lifted core fixes (block size, top-k, heads, kv heads, head dim)."""
from __future__ import annotations

from dataclasses import dataclass


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
