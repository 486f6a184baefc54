# moec kernel moec_moba_own_merge_bs16_k3_varlen
# IR node: %out_densify: f32[B, 4, T, 32] = own_block_merge(q=%q, k=%k, v=%v, indices=%indices, part_o=%out_part_o, part_lse=%out_part_lse, cu_seqlens=%cu_seqlens) {block_size=16, tiles={None: MobaAttentionTile(block_m=64, block_n=16, num_warps=4, num_stages=2)}}
# MoBA block-sparse attention forward, densify scheme, step 3 of 3: own block (causal) + log-sum-exp merge
#   q [B, H, N, D=32], k/v [B, Hkv, N, D], block indices [B, H, N, K=3],
#   partial out [B*H*N*K, D] and lse [B*H*N*K] of the past blocks (from the densify kernel; lse -inf = none)
#   -> out [B, H, N, D] (q's dtype), lse [B, H, N] (fp32, natural log)
# variant: block_size=16 GQA group=1 varlen=True causal=True dtype=float32
# tile: BLOCK_M=64 BLOCK_N=16 num_warps=4 num_stages=2
#
# One program per (query tile of BLOCK_M consecutive rows of one sequence, query head, batch). It
# attends to the rows' own blocks only (the diagonal: keys of the row's block up to the row, for rows
# whose indices list their own block; the keys visited run from the first row's block start to the last
# row), with one online softmax (exp2, fp32 m/l/acc). Then it folds in the row's K partials in slot
# order, each a normalised out o_s with its lse_s, as one more online-softmax step of weight
# exp(lse_s): m' = max(m, lse_s), l' = l e^(m - m') + e^(lse_s - m'), acc' = acc e^(m - m') + o_s e^(lse_s - m').
# The union's single softmax is exactly this merge. Slots without a partial (lse -inf: the own
# block, -1, future or duplicate blocks) add nothing and their out is never read. Rows with no key:
# out 0, lse -inf, as the rows scheme. Deterministic (fixed slot order, no atomics).
import triton
import triton.language as tl


@triton.jit
def moec_moba_own_merge_bs16_k3_varlen(
    q_ptr, k_ptr, v_ptr, idx_ptr, part_o_ptr, part_lse_ptr, out_ptr, lse_ptr,
    cu_ptr, tile_seq_ptr, tile_local_ptr,
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
    own = offs_m // BLOCK_SIZE
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qn
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    kslot = tl.arange(0, K_PAD)
    idx = tl.load(idx_ptr + b64 * stride_ib + h64 * stride_ih + rows[:, None] * stride_in
                  + kslot[None, :] * stride_ik, mask=mask_m[:, None] & (kslot < K)[None, :], other=-1)
    own_sel = tl.max((idx == own[:, None]).to(tl.int32), 1) > 0     # the row listed its own block
    k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    qk_scale = sm_scale * 1.4426950408889634              # scores in log2 units: exp2 below
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # ---- the diagonal: keys from the first row's block start to the last row, causal, same block
    n0 = ((tile * BLOCK_M) // BLOCK_SIZE) * BLOCK_SIZE
    while n0 <= last:                     # (a while loop: Triton 3.6's interpreter cannot range() over loaded values)
        kpos = n0 + offs_n
        kmask = kpos <= last
        krows = (seq_start + kpos).to(tl.int64)
        kt = tl.load(k_base + krows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     mask=kmask[:, None] & mask_d[None, :], other=0.0)
        vt = tl.load(v_base + krows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=kmask[:, None] & mask_d[None, :], other=0.0)
        if q.dtype == tl.float32:
            s = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kt))
        allowed = (own_sel[:, None] & kmask[None, :] & (kpos[None, :] <= offs_m[:, None])
                   & ((kpos // BLOCK_SIZE)[None, :] == own[:, None]))
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

    # ---- merge the past blocks' partials, slot by slot (each: weight exp(lse_s), normalised out o_s)
    part_row = ((b64 * H + h64) * N + rows) * K           # entry of (this query, slot 0)
    for slot in range(K):
        lse_s = tl.load(part_lse_ptr + part_row + slot, mask=mask_m, other=float("-inf")) * 1.4426950408889634
        has = lse_s > float("-inf")
        o_s = tl.load(part_o_ptr + (part_row + slot)[:, None] * D + offs_d[None, :],
                      mask=has[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        m_new = tl.maximum(m_i, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(lse_s - m_use)
        l_i = l_i * alpha + beta
        acc = acc * alpha[:, None] + beta[:, None] * o_s
        m_i = m_new

    # ---- out = acc / l, lse = ln(sum exp(scaled scores)); empty rows: 0 and -inf
    empty = l_i == 0.0
    l_use = tl.where(empty, 1.0, l_i)
    o = acc / l_use[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_use)) * 0.6931471805599453)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)      # a +inf score: lse +inf (out is NaN, as softmax's)
    tl.store(out_ptr + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_on
             + offs_d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + b64 * stride_lb + h64 * stride_lh + rows * stride_ln, lse, mask=mask_m)
