"""What the backward's grouped GEMMs cost (``grouped_dgrad``, ``grouped_wgrad``): problems for the cost model
(`passes/cost_model.py` ranks their legal tiles per token-count bucket, as for the forward's kernels).

``grouped_dgrad`` (`DgradProblem`) is a grouped GEMM over expert-sorted rows like the forward's: its grid, row
tiles, program order, waves and L2 re-reads are `GemmProblem`'s. It differs in what a tile holds and moves:
with a second product (``a2 @ w2``, the input gradient through gate and up) both products accumulate into one
fp32 tile, so a stage holds two A and two W tiles but the accumulators are one tile's; with the activation's
backward in its epilogue (``act_grad``) it also reads the gate (and up) rows and writes d gate (and d up) and
``h``, and holds those tiles in registers while it computes (counted as three accumulator tiles).

``grouped_wgrad`` (`WgradProblem`): one program per (expert, BLOCK_N x BLOCK_K tile of its gradient), reducing
over the expert's rows BLOCK_M at a time, so the grid does not grow with T, the work per program does. Its
tensor-core tile is BLOCK_N x BLOCK_K with BLOCK_M deep (the rows are the dot's reduction). Under uniform
routing each hit expert gets ``M / hit`` rows; each program reads its expert's rows of A (BLOCK_N columns) and
of B (BLOCK_K columns), so A is read once per K tile and B once per N tile, unless an expert's rows of both
fit in L2 (then once). Gradients are written once.
"""
from __future__ import annotations

from dataclasses import dataclass

from moec.ir.graph import Graph, Node
from moec.ir.tiles import GemmTile
from moec.ir.types import T
from moec.runtime.arch import Arch

from .cost_terms import (L2_SHARE, LINE_BYTES, MAX_ACC_REGS, SMEM_RESERVE, Num, Sym, cdiv, itemsize, mma_efficiency,
                         occupancy, per_token, pipeline_buffers, pow2, waves_time)
from .kernel_costs import GemmProblem


@dataclass(frozen=True)
class DgradProblem(GemmProblem):
    """A ``grouped_dgrad`` node (see the module docstring)."""

    two: bool = False           # a second product (a2 @ w2) into the same accumulators
    act_grad: bool = False      # the activation's backward in the epilogue
    act_glu: bool = False       # ... of a GLU: reads up too, writes d up

    @classmethod
    def of(cls, n: Node, g: Graph) -> "DgradProblem":
        a_t, out_t, a = g.types[n.ins["a"]], n.types[0], n.attr
        return cls(experts=a["num_experts"], routed="offsets" in n.ins, rows_per_token=per_token(out_t.shape[0]),
                   a_rows_per_token=per_token(a_t.shape[0]), n=int(out_t.shape[1]), k=int(a_t.shape[1]), glu=False,
                   in_size=itemsize(a_t.dtype), out_size=itemsize(out_t.dtype), fp32=a_t.dtype == "f32",
                   indexed=bool(a["gather_top_k"] or a["scatter"]), scale="scale" in n.ins, dtype=a_t.dtype,
                   out_dtype=out_t.dtype, gather_top_k=a["gather_top_k"], scatter=bool(a["scatter"]),
                   two="a2" in n.ins, act_grad=bool(a["act_grad"]), act_glu=bool(a["act_grad"] and a["glu"]))

    @property
    def key(self) -> str:
        bits = [super().key.replace("grouped_gemm", "grouped_dgrad", 1)]
        bits += [b for b, on in (("two", self.two), ("act_grad", self.act_grad)) if on]
        return " ".join(bits)

    @property
    def mats(self) -> int:
        return 2 if self.two else 1

    def bytes(self, t=T, ops=Sym, loads=None):
        M = self.rows(t, loads)
        b = self.mats * self.a_rows_per_token * t * self.k * self.in_size          # a (and a2), read once
        b += self.hit_experts(t, ops, loads) * self.mats * self.n * self.k * self.in_size
        b += M * self.n * self.out_size                                          # out
        if self.act_grad:                      # gate (and up) read; h (and d up) written; the partial dots
            products = 2 if self.act_glu else 1
            b += M * self.n * (products * self.in_size + products * self.out_size) + 4 * M * cdiv(self.n, 16)
        b += 4 * M * (int(self.indexed) + int(self.scale))
        return b

    def acc_regs(self, tile: GemmTile) -> float:
        return (3 if self.act_grad else 1) * tile.block_m * tile.block_n / (32 * tile.num_warps)

    def stage_bytes(self, tile: GemmTile) -> int:
        return self.mats * (tile.block_m + tile.block_n) * tile.block_k * self.in_size


@dataclass(frozen=True)
class WgradProblem:
    """A ``grouped_wgrad`` node: per expert, ``[N, K] = A^T B`` over its ``M / E`` rows (see the module docstring)."""

    experts: int
    rows_per_token: int      # M = rows_per_token * T rows in all
    n: int
    k: int
    in_size: int
    out_size: int
    fp32: bool
    gathered: bool           # reads the order vector
    scale: bool
    dbias: bool
    dtype: str = ""
    out_dtype: str = ""

    @classmethod
    def of(cls, n: Node, g: Graph) -> "WgradProblem":
        a_t, out_t, a = g.types[n.ins["a"]], n.types[0], n.attr
        rows = g.types[n.ins["order"]].shape[0] if "order" in n.ins else a_t.shape[0]
        return cls(experts=a["num_experts"], rows_per_token=per_token(rows), n=int(out_t.shape[1]),
                   k=int(out_t.shape[2]), in_size=itemsize(a_t.dtype), out_size=itemsize(out_t.dtype),
                   fp32=a_t.dtype == "f32", gathered=bool(a["gather_a"] or a["gather_b"]), scale="scale" in n.ins,
                   dbias="dbias" in n.outs, dtype=a_t.dtype, out_dtype=out_t.dtype)

    @property
    def key(self) -> str:
        m = f"{self.rows_per_token}T" if self.rows_per_token != 1 else "T"
        bits = [f"grouped_wgrad E={self.experts} M={m} N={self.n} K={self.k}"]
        bits += [b for b, on in (("gather", self.gathered), ("scale", self.scale), ("dbias", self.dbias)) if on]
        return " ".join(bits + [f"{self.dtype}->{self.out_dtype}"])

    def rows(self, t=T):
        return self.rows_per_token * t

    def hit_experts(self, t=T, ops=Sym):
        return ops.min(self.experts, self.rows(t))

    def flops(self, t=T):
        return 2 * self.rows(t) * self.n * self.k

    def bytes(self, t=T, ops=Sym):
        return (self.rows(t) * (self.n + self.k) * self.in_size + self.experts * self.n * self.k * self.out_size
                + 4 * self.rows(t) * (int(self.gathered) + int(self.scale)))

    def programs(self, tile: GemmTile, t=T, ops=Sym):
        return self.experts * cdiv(self.n, tile.block_n) * cdiv(self.k, tile.block_k)

    def waves(self, tile: GemmTile, arch: Arch, t=T, ops=Sym):
        return ops.ceil_div(self.programs(tile, t, ops), self.slots(tile, arch))

    def traffic(self, tile: GemmTile, arch: Arch, t: int) -> float:
        """Bytes from device memory at ``T = t``: each program reads its expert's rows of A and B; an expert's rows
        are read again by every N (for B) and K (for A) tile unless both fit in L2 (see the module docstring)."""
        M = self.rows(t)
        hit = self.hit_experts(t, Num)
        per_expert = (M / hit if hit else 0) * (self.n + self.k) * self.in_size
        a_reads, b_reads = ((1, 1) if per_expert <= arch.l2_bytes * L2_SHARE
                            else (cdiv(self.k, tile.block_k), cdiv(self.n, tile.block_n)))
        return float(self.bytes(t, Num) + (a_reads - 1) * M * self.n * self.in_size
                     + (b_reads - 1) * M * self.k * self.in_size)

    def stage_bytes(self, tile: GemmTile) -> int:
        return tile.block_m * (tile.block_n + tile.block_k) * self.in_size

    def smem(self, tile: GemmTile, arch: Arch) -> int:
        # with the routing-weight scale, the scaled A tile is staged through shared memory outside the pipeline
        # (Triton's allocation at the AOT compiles: BLOCK_M x BLOCK_N in fp32; counted at the operands' size
        # or fp32, whichever is larger)
        scaled = tile.block_m * tile.block_n * max(self.in_size, 4) if self.scale else 0
        return pipeline_buffers(tile.num_stages, tile.block_n, arch) * self.stage_bytes(tile) + scaled

    def acc_regs(self, tile: GemmTile) -> float:
        return tile.block_n * tile.block_k / (32 * tile.num_warps)

    def slots(self, tile: GemmTile, arch: Arch) -> int:
        return arch.sms * occupancy(self.smem(tile, arch), tile.num_warps, self.acc_regs(tile), arch)

    def fits(self, tile: GemmTile, arch: Arch) -> bool:
        return (self.smem(tile, arch) + SMEM_RESERVE <= arch.smem_per_block
                and self.acc_regs(tile) <= MAX_ACC_REGS)

    def time(self, tile: GemmTile, arch: Arch, t: int) -> float:
        """Predicted seconds at ``T = t`` (`cost_terms.waves_time`; the MMA's M is BLOCK_N)."""
        M = self.rows(t)
        hit = self.hit_experts(t, Num)
        iters = cdiv(cdiv(M, hit), tile.block_m) if hit else 0
        peak = (arch.fp32_tflops if self.fp32 else arch.bf16_tflops) * 1e12
        rate = peak * mma_efficiency(tile.block_n, arch, self.fp32)
        loaded = tile.block_m * (tile.block_n + tile.block_k) * self.in_size
        busy = hit / self.experts            # idle experts' programs only write zeros (their bytes are in traffic)
        return waves_time(self.programs(tile, t, Num), self.slots(tile, arch), arch,
                          flops_per_program=busy * 2 * iters * tile.block_m * tile.block_n * tile.block_k,
                          dram_total=self.traffic(tile, arch, t), l2_per_program=busy * iters * loaded,
                          in_flight=max(tile.num_stages - 1, 1) * loaded, flops_rate=rate, iters=max(iters, 1))


WGRAD_BM = (16, 32, 64, 128)
WGRAD_BNK = (16, 32, 64, 128, 256)
WGRAD_STAGES = (2, 3, 4)


def wgrad_candidates(p: WgradProblem, arch: Arch) -> list[GemmTile]:
    """Legal ``grouped_wgrad`` tiles: output blocks clamped to the padded gradient, K blocks of whole 128-byte
    lines where K allows (the rows' contiguous dim), row chunks (the reduction) from 16, 8 warps only for
    128 x 128 outputs or more, fitting; preference: the widest output tile (fewest re-reads of the rows), then
    the deepest row chunk, fewer warps, fewer stages."""
    out = []
    for bn in (b for b in WGRAD_BNK if b <= pow2(p.n)):
        for bk in (b for b in WGRAD_BNK if b <= pow2(p.k) and b * p.in_size >= min(LINE_BYTES, pow2(p.k) * p.in_size)):
            for bm in WGRAD_BM:
                for w in (4, 8):
                    if w == 8 and bn * bk < 128 * 128:
                        continue
                    for s in WGRAD_STAGES:
                        tile = GemmTile(bm, bn, bk, w, s, 8)
                        if p.fits(tile, arch):
                            out.append(tile)
    return sorted(out, key=lambda t: (-t.block_n * t.block_k, -t.block_m, t.num_warps, t.num_stages))
