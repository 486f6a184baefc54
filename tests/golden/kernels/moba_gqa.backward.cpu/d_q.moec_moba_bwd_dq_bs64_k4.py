# moec kernel moec_moba_bwd_dq_bs64_k4
# IR node: %d_q: f16[B, 8, T, 64] = block_sparse_attention_dq(q=%q, k=%k, v=%v, indices=%indices, d_out=%d_out, lse=%lse, delta=%delta) {block_size=64, tiles={None: MobaAttentionTile(block_m=64, block_n=64, num_warps=4, num_stages=1)}}
# MoBA block-sparse attention backward, d q: q [B, H, N, D=64], k/v [B, Hkv, N, D], block indices
#   [B, H, N, K=4], d out [B, H, N, D], the forward's lse [B, H, N] and delta = rowsum(d out * out) - d lse
#   -> d q [B, H, N, D] (q's dtype)
# variant: block_size=64 GQA group=4 varlen=False causal=True dtype=float16
# tile: BLOCK_M=64 BLOCK_N=64 num_warps=4 num_stages=1
#
# Query-tile-major, as the forward's rows scheme: one program per (query tile of one sequence, query head,
# batch) walks the union of the key blocks its rows selected, ascending, and for each BLOCK_N chunk
# recomputes the probabilities from the saved lse (p = exp(s - lse): no second softmax), then
# d s = p * (d out . v - delta) and d q += d s @ k. Rows that did not select a block, keys after the
# query and rows with no key (lse -inf) contribute nothing. The gate's selection has no gradient.
import triton
import triton.language as tl


@triton.jit
def moec_moba_bwd_dq_bs64_k4(
    q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, tile_seq_ptr, tile_local_ptr,
    N, H, S, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_in, stride_ik,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_lb, stride_lh, stride_ln,
    stride_eb, stride_eh, stride_en,
    stride_ob, stride_oh, stride_on, stride_od,
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
    last = tl.max(tl.where(mask_m, offs_m, 0), 0)
    c_max = last // BLOCK_SIZE
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    md = mask_m[:, None] & mask_d[None, :]

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + h64 * stride_qh + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=md, other=0.0)
    do = tl.load(do_ptr + b64 * stride_gb + h64 * stride_gh + rows[:, None] * stride_gn
                 + offs_d[None, :] * stride_gd, mask=md, other=0.0)
    lse = tl.load(lse_ptr + b64 * stride_lb + h64 * stride_lh + rows * stride_ln, mask=mask_m, other=float("-inf"))
    delta = tl.load(delta_ptr + b64 * stride_eb + h64 * stride_eh + rows * stride_en, mask=mask_m, other=0.0)
    kslot = tl.arange(0, K_PAD)
    idx = tl.load(idx_ptr + b64 * stride_ib + h64 * stride_ih + rows[:, None] * stride_in
                  + kslot[None, :] * stride_ik, mask=mask_m[:, None] & (kslot < K)[None, :], other=-1)
    k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    qk_scale = sm_scale * 1.4426950408889634              # scores in log2 units: exp2 below
    live = mask_m & (lse > float("-inf"))                 # rows with at least one key
    lse2 = tl.where(live, lse * 1.4426950408889634, 0.0)
    dq = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # ---- walk the union of the selected blocks, ascending
    j = tl.min(tl.where(idx >= 0, idx, 2147483647))
    while j <= c_max:
        sel = tl.max((idx == j).to(tl.int32), 1) > 0
        key0 = j * BLOCK_SIZE
        n_end = tl.minimum(BLOCK_SIZE, last + 1 - key0)
        n0 = n_end * 0
        while n0 < n_end:                 # (a while loop: Triton 3.6's interpreter cannot range() over a reduction)
            kin = n0 + offs_n
            kpos = key0 + kin
            kmask = (kin < BLOCK_SIZE) & (kpos < seq_len)
            krows = (seq_start + kpos).to(tl.int64)
            kt = tl.load(k_base + krows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                         mask=kmask[:, None] & mask_d[None, :], other=0.0)
            vt = tl.load(v_base + krows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                         mask=kmask[:, None] & mask_d[None, :], other=0.0)
            if q.dtype == tl.float32:
                s = tl.dot(q, tl.trans(kt), input_precision="ieee")
                dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
                dp = tl.dot(do, tl.trans(vt))
            allowed = (sel & live)[:, None] & kmask[None, :] & (kpos[None, :] <= offs_m[:, None])
            p = tl.where(allowed, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            if q.dtype == tl.float32:
                dq = tl.dot(ds, kt, dq, input_precision="ieee")
            else:
                dq = tl.dot(ds.to(kt.dtype), kt, dq)
            n0 += BLOCK_N
        j = tl.min(tl.where(idx > j, idx, 2147483647))

    dq = dq * sm_scale
    tl.store(dq_ptr + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od,
             dq.to(dq_ptr.dtype.element_ty), mask=md)
