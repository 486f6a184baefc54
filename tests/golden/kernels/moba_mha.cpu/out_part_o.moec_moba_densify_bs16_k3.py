# moec kernel moec_moba_densify_bs16_k3
# IR node: %out_part_o: f32[12*B*T, 32], %out_part_lse: f32[12*B*T] = densify_attention(q=%q, k=%k, v=%v, indices=%indices) {block_size=16, tiles={None: MobaAttentionTile(block_m=64, block_n=16, num_warps=4, num_stages=1)}}
# MoBA block-sparse attention forward, densify scheme, step 2 of 3 (past blocks): gathered q rows x one key block
#   q [B, H, N, D=32], k/v [B, Hkv, N, D], per (batch, kv head, key block) lists of the selections
#   (query row, slot) that picked the block (CSR: offsets + entries, from the collect step)
#   -> partial out [B*H*N*K, D] (normalised, q's dtype) and partial lse [B*H*N*K] (fp32, natural log),
#      one per (query, slot), K=3 slots
# variant: block_size=16 GQA group=1 varlen=False dtype=float32
# tile: BLOCK_M=64 gathered rows, BLOCK_N=16 keys, num_warps=4 num_stages=1
#
# FlashMoBA's "collect and densify", key-block-major. One program per (chunk of BLOCK_M entries of one
# (batch, kv head, key block) list): it gathers the q rows of those entries (any query head of the
# GQA group: they share the block's keys, so one pass over K and V serves them all), streams the
# block's BLOCK_SIZE keys and values in BLOCK_N chunks (a constexpr trip count: a loop Triton
# pipelines), computes dense [BLOCK_M, BLOCK_N] scores with tl.dot and runs an online softmax (exp2,
# fp32 m/l/acc). No causal mask: the lists hold only blocks strictly before the query's own block,
# so every key is visible and every block is full. Each entry writes its own partial (out / l and
# lse) at its (query, slot) position: no atomics, no merge here (the own-block kernel merges).
# Programs map to chunks through chunk_seg/chunk_local (sized from a static bound; surplus programs
# exit at once), so the grid never depends on the routing.
import triton
import triton.language as tl


@triton.jit
def moec_moba_densify_bs16_k3(
    q_ptr, k_ptr, v_ptr, ent_ptr, off_ptr, chunk_seg_ptr, chunk_local_ptr, blk_start_ptr,
    part_o_ptr, part_lse_ptr,
    N, H, HKV, NB, N_SEG, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    D: tl.constexpr, D_PAD: tl.constexpr, K: tl.constexpr, BLOCK_SIZE: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(chunk_seg_ptr + pid)
    if seg >= N_SEG:                      # a surplus program: no chunk left
        return
    local = tl.load(chunk_local_ptr + pid)

    # ---- the list this chunk belongs to: segment = (batch * HKV + kv head) * NB + key block
    bhk = seg // NB
    blk = seg % NB
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    if VARLEN:
        key0 = tl.load(blk_start_ptr + blk).to(tl.int64)    # the block's first packed row
    else:
        key0 = blk.to(tl.int64) * BLOCK_SIZE

    # ---- gather the chunk's entries: entry = ((b * H + h) * N + row) * K + slot
    first = tl.load(off_ptr + seg) + local.to(tl.int64) * BLOCK_M
    last = tl.load(off_ptr + seg + 1)
    e = first + tl.arange(0, BLOCK_M)
    mask_m = e < last
    ent = tl.load(ent_ptr + e, mask=mask_m, other=0).to(tl.int64)
    row_bh = ent // K                     # (b * H + h) * N + row
    row = row_bh % N
    h = (row_bh // N) % H
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h[:, None] * stride_qh + row[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    qk_scale = sm_scale * 1.4426950408889634              # scores in log2 units: exp2 below
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # ---- the whole block, dense: every key of it is before every gathered query
    for n0 in range(0, BLOCK_SIZE, BLOCK_N):
        kin = n0 + offs_n
        kmask = kin < BLOCK_SIZE
        krows = key0 + kin
        kt = tl.load(k_base + krows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=kmask[:, None] & mask_d[None, :], other=0.0)
        vt = tl.load(v_base + krows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=kmask[:, None] & mask_d[None, :], other=0.0)
        if q.dtype == tl.float32:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        s = tl.where(kmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))             # finite from the first chunk on (key 0 is valid)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if q.dtype == tl.float32:
            acc = tl.dot(p, vt, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(vt.dtype), vt, acc)
        m_i = m_new

    # ---- this (query, slot)'s partial: normalised out and its lse (natural log)
    o = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    lse = tl.where(m_i == float("inf"), float("inf"), lse)      # a +inf score: lse +inf (out is NaN, as softmax's)
    tl.store(part_o_ptr + ent[:, None] * D + offs_d[None, :], o.to(part_o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(part_lse_ptr + ent, lse, mask=mask_m)
