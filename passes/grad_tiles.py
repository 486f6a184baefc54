"""Tiles of the backward's grouped GEMMs (``grouped_dgrad``, ``grouped_wgrad``): per-arch tables (the
cost model does not model the backward kernels yet), narrowed to the problem's padded dims and with
stages cut until the pipelined shared memory fits the arch.

``grouped_dgrad`` tiles are row tiles like the forward's (BLOCK_M pairs x BLOCK_N outputs, BLOCK_K deep;
64 rows: the smallest wgmma/tcgen05 M); with a second product (``a2``) each stage holds two A and two W
tiles. ``grouped_wgrad`` tiles are output tiles (BLOCK_N x BLOCK_K of an expert's gradient) that reduce
over the expert's rows BLOCK_M at a time. ``cpu`` is the Triton interpreter: few, wide programs.
"""
from __future__ import annotations

from moec.ir.tiles import GemmTile, pow2
from moec.runtime.arch import Arch

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
_DGRAD = {"cpu": (16, 64, 64, 4, 1), "sm80": (64, 128, 32, 4, 3), "sm86": (64, 64, 32, 4, 3),
          "sm89": (64, 64, 32, 4, 3), "sm90": (64, 128, 64, 8, 3), "sm100": (64, 128, 64, 8, 3),
          "sm120": (64, 64, 32, 4, 3)}
_WGRAD = {"cpu": (64, 64, 64, 4, 1), "sm80": (32, 128, 64, 8, 3), "sm86": (32, 64, 64, 4, 3),
          "sm89": (32, 64, 64, 4, 3), "sm90": (64, 128, 128, 8, 3), "sm100": (64, 128, 128, 8, 3),
          "sm120": (32, 64, 64, 4, 3)}


def _fit(bm, bn, bk, warps, stages, arch: Arch, per_stage) -> GemmTile:
    while stages > 1 and arch.name != "cpu" and per_stage(bm, bn, bk) * stages > arch.smem_per_block:
        stages -= 1
    return GemmTile(bm, bn, bk, warps, stages, 8)


def dgrad_tile(n_out: int, k_dim: int, two: bool, arch: Arch, itemsize: int = 2) -> GemmTile:
    """A ``grouped_dgrad`` tile for ``n_out`` outputs reducing over ``k_dim``."""
    bm, bn, bk, w, s = _DGRAD.get(arch.name, _DGRAD["sm80"])
    bn, bk = min(bn, pow2(n_out)), min(bk, pow2(k_dim))
    mats = 2 if two else 1
    return _fit(bm, bn, bk, w, s, arch, lambda m, n, k: mats * (m * k + k * n) * itemsize)


def wgrad_tile(n_out: int, k_out: int, arch: Arch, itemsize: int = 2) -> GemmTile:
    """A ``grouped_wgrad`` tile for an ``[n_out, k_out]`` gradient per expert."""
    bm, bn, bk, w, s = _WGRAD.get(arch.name, _WGRAD["sm80"])
    bn, bk = min(bn, pow2(n_out)), min(bk, pow2(k_out))
    return _fit(bm, bn, bk, w, s, arch, lambda m, n, k: (m * n + m * k) * itemsize)


def grad_tile(n, g, arch: Arch) -> GemmTile:
    """The tile of a backward kernel node ``n`` of graph ``g``."""
    size = 4 if g.types[n.ins["a"]].dtype == "f32" else 2
    if n.op == "grouped_dgrad":
        return dgrad_tile(int(n.types[0].shape[1]), int(g.types[n.ins["a"]].shape[1]), "a2" in n.ins, arch, size)
    return wgrad_tile(int(n.types[0].shape[1]), int(n.types[0].shape[2]), arch, size)
