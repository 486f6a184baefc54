# moec kernel moec_moba_gate_bs16_k3
# IR node: %indices: i32[B, 4, T, 3] = fused_block_gate(q=%q, k=%k) {block_size=16, top_k=3, tiles={None: MobaGateTile(block_m=64, block_nb=32, num_warps=4, num_stages=1)}}
# MoBA gate: q [B, H, N, D=32], pooled keys [B, Hkv, NB, D] -> block indices [B, H, N, top_k=3]
# variant: block_size=16 GQA group=1 varlen=False dtype=float32
# tile: BLOCK_M=64 BLOCK_NB=32 num_warps=4 num_stages=1
#
# Fused gate + top-k. One program per (query tile of BLOCK_M rows of one sequence, query head, batch):
# its q tile [BLOCK_M, D_PAD] stays in registers while tiles of BLOCK_NB pooled keys of the kv head
# (the tile's past blocks 0 .. c_max-1 only) stream through; scores = q @ pooled^T (fp32 accumulation,
# no scale; fp32 operands exact). A row competes only for blocks j < c(row) = row // BLOCK_SIZE.
# Each row keeps a running top-(K-1) in registers, an unsorted list (value, block) of K1_PAD slots
# (slots >= K-1 disabled): K-1 times per tile, the tile's best remaining block (lowest index on ties)
# replaces the list's worst entry (lowest value, then highest block) if strictly better; blocks stream
# in ascending order, so "strictly" keeps ties on the lower block index. NaN scores rank first, -inf
# counts as -FLT_MAX (an eligible block always beats an empty slot). At the end the row writes its
# selected blocks in ascending order, its own block c(row) last, -1 in the unused slots. Only these
# [B, H, N, K] indices reach global memory: the N x NB score matrix never exists.
# Varlen: programs read (sequence, tile) from tile_seq/tile_local, exit when tile_seq >= S; block
# numbers are local to the sequence, whose pooled keys start at row boff[s] of the pooled tensor.
import triton
import triton.language as tl


@triton.jit
def moec_moba_gate_bs16_k3(
    q_ptr, pk_ptr, idx_ptr, cu_ptr, tile_seq_ptr, tile_local_ptr, boff_ptr,
    N, H, S,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_pb, stride_ph, stride_pn, stride_pd,
    stride_ib, stride_ih, stride_in, stride_ik,
    D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    K: tl.constexpr, K1: tl.constexpr, K_PAD: tl.constexpr, K1_PAD: tl.constexpr,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP

    # ---- which sequence and which of its query tiles this program owns
    if VARLEN:
        seq = tl.load(tile_seq_ptr + pid_m)
        if seq >= S:                      # a surplus program: no tile left
            return
        tile = tl.load(tile_local_ptr + pid_m)
        seq_start = tl.load(cu_ptr + seq)
        seq_len = tl.load(cu_ptr + seq + 1) - seq_start
        blk0 = tl.load(boff_ptr + seq)
    else:
        tile = pid_m
        seq_start = 0
        seq_len = N
        blk0 = 0

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)       # positions inside the sequence
    mask_m = offs_m < seq_len
    rows = (seq_start + offs_m).to(tl.int64)
    own = offs_m // BLOCK_SIZE                              # c(row)
    c_max = tl.max(tl.where(mask_m, own, 0), 0)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    # ---- running top-(K-1) over the past blocks, in registers
    slot = tl.arange(0, K1_PAD)
    slot_ok = slot < K1
    top_v = tl.where(slot_ok[None, :], float("-inf"), float("inf")) + tl.zeros((BLOCK_M, K1_PAD), tl.float32)
    top_i = tl.full((BLOCK_M, K1_PAD), -1, tl.int32)
    if K1 > 0:
        pk_base = pk_ptr + b.to(tl.int64) * stride_pb + hk.to(tl.int64) * stride_ph
        j0 = c_max * 0
        while j0 < c_max:                 # (a while loop: Triton 3.6's interpreter cannot range() over a reduction)
            offs_j = j0 + tl.arange(0, BLOCK_NB)
            pk = tl.load(pk_base + (blk0 + offs_j).to(tl.int64)[:, None] * stride_pn + offs_d[None, :] * stride_pd,
                         mask=(offs_j < c_max)[:, None] & mask_d[None, :], other=0.0)
            if (q.dtype == pk.dtype) and (q.dtype != tl.float32):
                s = tl.dot(q, tl.trans(pk))
            else:
                s = tl.dot(q.to(tl.float32), tl.trans(pk.to(tl.float32)), input_precision="ieee")
            s = tl.where(s != s, float("inf"), s)                    # NaN ranks first
            s = tl.maximum(s, -3.4028234663852886e38)                # -inf: the lowest finite score
            s = tl.where(offs_j[None, :] < own[:, None], s, float("-inf"))
            for _ in range(K1):
                best = tl.max(s, 1)
                best_j = tl.min(tl.where(s == best[:, None], offs_j[None, :], 2147483647), 1)
                worst = tl.min(top_v, 1)                             # disabled slots hold +inf
                cand = slot_ok[None, :] & (top_v == worst[:, None])
                worst_i = tl.max(tl.where(cand, top_i, -2), 1)
                worst_slot = tl.min(tl.where(cand & (top_i == worst_i[:, None]), slot[None, :], K1_PAD), 1)
                hit = (slot[None, :] == worst_slot[:, None]) & (best > worst)[:, None]
                top_v = tl.where(hit, best[:, None], top_v)
                top_i = tl.where(hit, best_j[:, None], top_i)
                s = tl.where(offs_j[None, :] == best_j[:, None], float("-inf"), s)
            j0 += BLOCK_NB

    # ---- write the selection: past blocks ascending, then the own block, then -1
    kslot = tl.arange(0, K_PAD)
    out = tl.full((BLOCK_M, K_PAD), -1, tl.int32)
    valid = slot_ok[None, :] & (top_v > float("-inf"))
    rem = tl.where(valid, top_i, 2147483647)
    for r in range(K1):
        low = tl.min(rem, 1)
        out = tl.where((kslot[None, :] == r) & (low < 2147483647)[:, None], low[:, None], out)
        rem = tl.where(rem == low[:, None], 2147483647, rem)
    count = tl.sum(valid.to(tl.int32), 1)
    out = tl.where(kslot[None, :] == count[:, None], own[:, None], out)
    idx_base = idx_ptr + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih
    tl.store(idx_base + rows[:, None] * stride_in + kslot[None, :] * stride_ik, out,
             mask=mask_m[:, None] & (kslot < K)[None, :])
