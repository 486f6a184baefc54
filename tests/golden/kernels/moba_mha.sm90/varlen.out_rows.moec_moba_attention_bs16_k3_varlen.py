# moec kernel moec_moba_attention_bs16_k3_varlen
# IR node: %out_rows: f32[B, 4, T, 32] = block_sparse_attention(q=%q, k=%k, v=%v, indices=%indices, cu_seqlens=%cu_seqlens) {block_size=16, scheme='rows', tiles={None: MobaAttentionTile(block_m=64, block_n=16, num_warps=4, num_stages=3)}}
# MoBA block-sparse attention forward: q [B, H, N, D=32], k/v [B, Hkv, N, D], block indices [B, H, N, K=3]
#   -> out [B, H, N, D] (q's dtype), lse [B, H, N] (fp32, natural log)
# variant: block_size=16 GQA group=1 varlen=True causal=True dtype=float32
# tile: BLOCK_M=64 BLOCK_N=16 num_warps=4 num_stages=3
#
# Scheme: query-tile-major with row masks. One program per (query tile of BLOCK_M rows of one sequence,
# query head, batch). Its q tile and its index tile [BLOCK_M, K_PAD] stay in registers. It visits the
# union of the key blocks its rows selected, in ascending order, jumping from one to the next with a
# min over the index tile (j = min{idx > j}); blocks no row selected are never touched, and the walk
# stops past c_max (the tile's last own block: later blocks are causally empty). For each visited
# block, in chunks of BLOCK_N keys, it computes the full [BLOCK_M, BLOCK_N] scores with tl.dot (dense
# tensor-core work), masks the rows that did not select the block and, on the diagonal, keys after the
# query (key <= query), and does a flash-attention online-softmax update (exp2, fp32 m/l/acc). One
# softmax over the union: no partial results, no merge, no atomics. Rows with no key: out 0, lse -inf.
#
# Toward FlashMoBA ("collect and densify"): the work here is |union of the tile's blocks| x BLOCK_M x bs
# for BLOCK_M x top_k x bs useful, fine when neighbouring queries pick similar blocks or N is short.
# The GPU version keeps this program's contract (indices in, one online softmax per row, out + lse)
# and swaps the row mask for a gather: per key block a sorted list of the queries that selected it
# (CSC, built from these same indices), dense tiles of gathered rows, row state (m, l, acc) owned by a
# query window. The masking, causal diagonal and online-softmax code below is what those tiles run.
import triton
import triton.language as tl


@triton.jit
def moec_moba_attention_bs16_k3_varlen(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr, cu_ptr, tile_seq_ptr, tile_local_ptr,
    N, H, S, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_in, stride_ik,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    else:
        tile = pid_m
        seq_start = 0
        seq_len = N

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)       # query positions inside the sequence
    mask_m = offs_m < seq_len
    rows = (seq_start + offs_m).to(tl.int64)
    last = tl.max(tl.where(mask_m, offs_m, 0), 0)         # the tile's last query position
    c_max = last // BLOCK_SIZE
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D

    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    kslot = tl.arange(0, K_PAD)
    idx = tl.load(idx_ptr + b64 * stride_ib + h.to(tl.int64) * stride_ih + rows[:, None] * stride_in
                  + kslot[None, :] * stride_ik, mask=mask_m[:, None] & (kslot < K)[None, :], other=-1)
    k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    qk_scale = sm_scale * 1.4426950408889634              # scores in log2 units: exp2 below
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # ---- walk the union of the selected blocks, ascending
    j = tl.min(tl.where(idx >= 0, idx, 2147483647))
    while j <= c_max:
        sel = tl.max((idx == j).to(tl.int32), 1) > 0                  # rows that selected block j
        key0 = j * BLOCK_SIZE
        n_end = tl.minimum(BLOCK_SIZE, last + 1 - key0)              # keys past the tile's last query: none
        n0 = n_end * 0
        while n0 < n_end:                 # (a while loop: Triton 3.6's interpreter cannot range() over a reduction)
            kin = n0 + offs_n                                         # key offset inside block j
            kpos = key0 + kin                                         # key position inside the sequence
            kmask = (kin < BLOCK_SIZE) & (kpos < seq_len)
            krows = (seq_start + kpos).to(tl.int64)
            kt = tl.load(k_base + krows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                         mask=kmask[:, None] & mask_d[None, :], other=0.0)
            vt = tl.load(v_base + krows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                         mask=kmask[:, None] & mask_d[None, :], other=0.0)
            if q.dtype == tl.float32:
                s = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            allowed = sel[:, None] & kmask[None, :] & (kpos[None, :] <= offs_m[:, None])
            s = tl.where(allowed, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)      # a row with nothing yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if q.dtype == tl.float32:
                acc = tl.dot(p, vt, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(vt.dtype), vt, acc)
            m_i = m_new
            n0 += BLOCK_N
        j = tl.min(tl.where(idx > j, idx, 2147483647))

    # ---- out = acc / l, lse = ln(sum exp(scaled scores)); empty rows: 0 and -inf
    empty = l_i == 0.0
    l_use = tl.where(empty, 1.0, l_i)
    o = acc / l_use[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_use)) * 0.6931471805599453)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)      # a +inf score: lse +inf (out is NaN, as softmax's)
    tl.store(out_ptr + b64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_on
             + offs_d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + b64 * stride_lb + h.to(tl.int64) * stride_lh + rows * stride_ln, lse, mask=mask_m)
