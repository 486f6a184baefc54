# moec kernel moec_moba_bwd_dkdv_bs64_k4_varlen
# IR node: %d_k: f16[B, 2, T, 64], %d_v: f16[B, 2, T, 64] = block_sparse_attention_dkdv(q=%q, k=%k, v=%v, indices=%indices, d_out=%d_out, lse=%lse, delta=%delta, cu_seqlens=%cu_seqlens) {block_size=64, tiles={None: MobaAttentionTile(block_m=64, block_n=64, num_warps=4, num_stages=1)}}
# MoBA block-sparse attention backward, d k and d v: q [B, H, N, D=64], k/v [B, Hkv, N, D], block
#   indices [B, H, N, K=4] and, per (batch, kv head, key block), the list of the queries that selected it
#   (CSR: offsets + entries, the forward's collect step), d out, lse, delta -> d k, d v [B, Hkv, N, D]
# variant: block_size=64 GQA group=4 varlen=True causal=True dtype=float16
# tile: BLOCK_M=64 query rows, BLOCK_N=64 keys, num_warps=4 num_stages=1
#
# Key-block-major (FlashMoBA's densified backward): one program per (BLOCK_N keys of one key block, kv head,
# batch) keeps its k, v chunk and its d k, d v accumulators on chip, and visits only the queries that
# attend to those keys: first the block's own queries (every query head of the GQA group; causal:
# key <= query; rows whose indices leave their own block out skip it), then the gathered rows of the
# block's list (queries of later blocks of the sequence, any head of the group: every key visible).
# Per visit: p = exp(s - lse) from the saved lse, d v += p^T d out, d s = p * (d out . v - delta),
# d k += d s^T q. No N x N work, no atomics: each key row is written once, by its program.
import triton
import triton.language as tl


@triton.jit
def moec_moba_bwd_dkdv_bs64_k4_varlen(
    q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    ent_ptr, off_ptr, blk_start_ptr, blk_end_ptr, blk_local_ptr,
    N, H, HKV, NB, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_in, stride_ik,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_lb, stride_lh, stride_ln,
    stride_eb, stride_eh, stride_en,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = pid // CHUNKS                   # (batch * HKV + kv head) * NB + key block; CHUNKS per block
    chunk = pid % CHUNKS
    bhk = seg // NB
    blk = seg % NB
    b = (bhk // HKV).to(tl.int64)
    hk = bhk % HKV
    if VARLEN:
        key0 = tl.load(blk_start_ptr + blk)               # the block's first packed row
        kend = tl.load(blk_end_ptr + blk)                 # its end (its sequence's end at most)
        jloc = tl.load(blk_local_ptr + blk)               # its number inside its sequence
    else:
        key0 = blk * BLOCK_SIZE
        kend = tl.minimum(key0 + BLOCK_SIZE, N)
        jloc = blk
    k_first = key0 + chunk * BLOCK_N
    if k_first >= kend:                   # past the block's (or a sequence's) last key
        return

    offs_n = k_first + tl.arange(0, BLOCK_N)
    kmask = offs_n < kend
    krows = offs_n.to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    nd = kmask[:, None] & mask_d[None, :]
    hk64 = hk.to(tl.int64)
    kt = tl.load(k_ptr + b * stride_kb + hk64 * stride_kh + krows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 mask=nd, other=0.0)
    vt = tl.load(v_ptr + b * stride_vb + hk64 * stride_vh + krows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                 mask=nd, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    kslot = tl.arange(0, K_PAD)

    # ---- the block's own queries (from the chunk's first key on: earlier ones see none of it), causal
    for g in range(GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        for m0 in range(k_first, kend, BLOCK_M):
            qrows = m0 + tl.arange(0, BLOCK_M)
            qmask = qrows < kend
            r64 = qrows.to(tl.int64)
            md = qmask[:, None] & mask_d[None, :]
            q = tl.load(q_ptr + b * stride_qb + h64 * stride_qh + r64[:, None] * stride_qn
                        + offs_d[None, :] * stride_qd, mask=md, other=0.0)
            do = tl.load(do_ptr + b * stride_gb + h64 * stride_gh + r64[:, None] * stride_gn
                         + offs_d[None, :] * stride_gd, mask=md, other=0.0)
            lse = tl.load(lse_ptr + b * stride_lb + h64 * stride_lh + r64 * stride_ln, mask=qmask, other=float("-inf"))
            delta = tl.load(delta_ptr + b * stride_eb + h64 * stride_eh + r64 * stride_en, mask=qmask, other=0.0)
            idx = tl.load(idx_ptr + b * stride_ib + h64 * stride_ih + r64[:, None] * stride_in
                          + kslot[None, :] * stride_ik, mask=qmask[:, None] & (kslot < K)[None, :], other=-1)
            live = qmask & (lse > float("-inf")) & (tl.max((idx == jloc).to(tl.int32), 1) > 0)
            lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
            if q.dtype == tl.float32:
                s = tl.dot(q, tl.trans(kt), input_precision="ieee")
                dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
                dp = tl.dot(do, tl.trans(vt))
            allowed = live[:, None] & kmask[None, :] & (offs_n[None, :] <= qrows[:, None])
            p = tl.where(allowed, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            if q.dtype == tl.float32:
                dv = tl.dot(tl.trans(p), do, dv, input_precision="ieee")
                dk = tl.dot(tl.trans(ds), q, dk, input_precision="ieee")
            else:
                dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)

    # ---- the queries of later blocks that selected this one (the list): every key visible
    lo = tl.load(off_ptr + seg)
    hi = tl.load(off_ptr + seg + 1)
    for e0 in range(lo, hi, BLOCK_M):
        e = e0 + tl.arange(0, BLOCK_M)
        emask = e < hi
        ent = tl.load(ent_ptr + e, mask=emask, other=0).to(tl.int64)
        row_bh = ent // K                 # entry = ((b * H + h) * N + row) * K + slot
        row = row_bh % N
        h = (row_bh // N) % H
        md = emask[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + row[:, None] * stride_qn
                    + offs_d[None, :] * stride_qd, mask=md, other=0.0)
        do = tl.load(do_ptr + b * stride_gb + h[:, None] * stride_gh + row[:, None] * stride_gn
                     + offs_d[None, :] * stride_gd, mask=md, other=0.0)
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + row * stride_ln, mask=emask, other=float("-inf"))
        delta = tl.load(delta_ptr + b * stride_eb + h * stride_eh + row * stride_en, mask=emask, other=0.0)
        live = emask & (lse > float("-inf"))
        lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
        if q.dtype == tl.float32:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
            dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
            dp = tl.dot(do, tl.trans(vt))
        p = tl.where(live[:, None] & kmask[None, :], tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if q.dtype == tl.float32:
            dv = tl.dot(tl.trans(p), do, dv, input_precision="ieee")
            dk = tl.dot(tl.trans(ds), q, dk, input_precision="ieee")
        else:
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv)
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk)

    dk = dk * sm_scale
    base = b * stride_dkb + hk64 * stride_dkh + krows[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(dk_ptr + base, dk.to(dk_ptr.dtype.element_ty), mask=nd)
    tl.store(dv_ptr + base, dv.to(dv_ptr.dtype.element_ty), mask=nd)
