# moec kernel moec_moba_window_bs16_k3
# IR node: %out_densify: f32[B, 4, T, 32] = block_sparse_attention(q=%q, k=%k, v=%v, indices=%indices) {block_size=16, scheme='densify', tiles={None: MobaAttentionTile(block_m=64, block_n=16, num_warps=8, num_stages=2, window=256)}}
# MoBA block-sparse attention forward, densify scheme: q [B, H, N, D=32], k/v [B, Hkv, N, D],
#   block indices [B, H, N, K=3] -> out [B, H, N, D] (q's dtype), lse [B, H, N] (fp32, natural log)
# variant: block_size=16 GQA group=1 varlen=False causal=True dtype=float32
# tile: WINDOW=256 query rows per program, BLOCK_M=64 gathered rows, BLOCK_N=16 keys, num_warps=8 num_stages=2
#
# FlashMoBA's collect and densify with window ownership. One program per (window of WINDOW consecutive
# rows of one sequence, query head, batch); it owns its rows' running softmax (m, l, acc in fp32) from
# the first block to the last, so nothing is merged afterwards and no per-(query, slot) partial exists.
#
# 1. Every selected block up to the row's own, ascending over the union of the window's selections (the
#    index tile stays in registers; j = min{idx > j}): the rows that selected block j are compacted into
#    a list (rank = cumsum of the selection; duplicates count once), then gathered BLOCK_M at a time
#    into dense tiles against the block's keys in BLOCK_N chunks (a loop the compiler pipelines), keys
#    up to the query: the whole block when it is past for every gathered row, the diagonal when it is
#    the own block of some. A gathered row's (m, l, acc) lives in the window's slice of an fp32 state
#    buffer (WINDOW x (D + 2) x 4 bytes per program: stays in L2); a row's first block starts it
#    afresh, so the buffer needs no fill. Barriers order a chunk's state stores before the next
#    block's loads (and the list's stores before its loads).
# 2. BLOCK_M consecutive rows at a time: the state is read back, normalised, and out / lse written.
# Rows with no key: out 0, lse -inf. Deterministic: fixed block order, no atomics.
import triton
import triton.language as tl


@triton.jit
def moec_moba_window_bs16_k3(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr, cu_ptr, tile_seq_ptr, tile_local_ptr,
    acc_ptr, ml_ptr, list_ptr,
    N, H, S, N_PROG, sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_in, stride_ik,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    K: tl.constexpr, K_PAD: tl.constexpr, VARLEN: tl.constexpr,
    WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_w = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP

    # ---- which sequence and which of its windows this program owns
    if VARLEN:
        seq = tl.load(tile_seq_ptr + pid_w)
        if seq >= S:                      # a surplus program: no window left
            return
        window = tl.load(tile_local_ptr + pid_w)
        seq_start = tl.load(cu_ptr + seq)
        seq_len = tl.load(cu_ptr + seq + 1) - seq_start
    else:
        window = pid_w
        seq_start = 0
        seq_len = N

    w0 = window * WINDOW                                  # the window's first position in the sequence
    offs_w = w0 + tl.arange(0, WINDOW)
    mask_w = offs_w < seq_len
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    row0 = (seq_start + w0).to(tl.int64)                  # the window's first packed row
    state0 = (b64 * H + h64) * N + row0                   # its first row in the state buffer
    list_base = list_ptr + (pid_bh.to(tl.int64) * N_PROG + pid_w) * WINDOW
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_M)
    kslot = tl.arange(0, K_PAD)
    q_base = q_ptr + b64 * stride_qb + h64 * stride_qh
    i_base = idx_ptr + b64 * stride_ib + h64 * stride_ih
    k_base = k_ptr + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    qk_scale = sm_scale * 1.4426950408889634              # scores in log2 units: exp2 below
    NONE = 2147483647

    # ---- the window's selections: blocks up to the row's own (later ones hold no visible key)
    idx = tl.load(i_base + (row0 + tl.arange(0, WINDOW))[:, None] * stride_in + kslot[None, :] * stride_ik,
                  mask=mask_w[:, None] & (kslot < K)[None, :], other=-1)
    sel_w = tl.where((idx >= 0) & (idx <= (offs_w // BLOCK_SIZE)[:, None]), idx, NONE)
    first = tl.min(sel_w, 1)                              # each row's first block (NONE: no key at all)

    # ---- 1. every selected block, ascending: gathered rows x the block's keys, state through the buffer
    j = tl.min(first, 0)
    while j < NONE:
        sel = tl.max((sel_w == j).to(tl.int32), 1)                    # rows that selected block j
        n_j = tl.sum(sel, 0)
        # the list: window offset * 2 + (block j is the row's first: start afresh)
        tl.store(list_base + tl.cumsum(sel, 0) - 1, tl.arange(0, WINDOW) * 2 + (first == j).to(tl.int32),
                 mask=sel > 0)
        tl.debug_barrier()
        k_blk = k_base + (seq_start + j * BLOCK_SIZE).to(tl.int64) * stride_kn   # the block's first key
        v_blk = v_base + (seq_start + j * BLOCK_SIZE).to(tl.int64) * stride_vn
        for c0 in range(0, n_j, BLOCK_M):
            mask_c = c0 + offs_b < n_j
            ent = tl.load(list_base + c0 + offs_b, mask=mask_c, other=0)
            loc = ent // 2                                            # gathered rows' window offsets
            keep = mask_c & (ent % 2 == 0)                            # rows with a state to continue
            # keys at or before the query: the whole block for a past block, the diagonal for the own one
            qpos = tl.where(mask_c, w0 + loc - j * BLOCK_SIZE, -1)    # query positions from the block start
            n_end = tl.minimum(tl.max(qpos, 0) + 1, BLOCK_SIZE)
            q = tl.load(q_base + (row0 + loc.to(tl.int64))[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                        mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            st = state0 + loc
            m_i = tl.load(ml_ptr + 2 * st, mask=keep, other=float("-inf"), cache_modifier=".cg")
            l_i = tl.load(ml_ptr + 2 * st + 1, mask=keep, other=0.0, cache_modifier=".cg")
            acc = tl.load(acc_ptr + st[:, None] * D + offs_d[None, :], mask=keep[:, None] & mask_d[None, :],
                          other=0.0, cache_modifier=".cg")
            for n0 in range(0, n_end, BLOCK_N):
                kin = n0 + offs_n                                     # int32 offsets from the block's start
                kmask = kin < n_end
                kt = tl.load(k_blk + kin[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                             mask=kmask[:, None] & mask_d[None, :], other=0.0)
                vt = tl.load(v_blk + kin[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                             mask=kmask[:, None] & mask_d[None, :], other=0.0)
                if q.dtype == tl.float32:
                    s = tl.dot(q, tl.trans(kt), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(kt))
                s = tl.where(kmask[None, :] & (kin[None, :] <= qpos[:, None]), s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet
                alpha = tl.exp2(m_i - m_use)
                p = tl.exp2(s - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None]
                if q.dtype == tl.float32:
                    acc = tl.dot(p, vt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(p.to(vt.dtype), vt, acc)
                m_i = m_new
            tl.store(ml_ptr + 2 * st, m_i, mask=mask_c)
            tl.store(ml_ptr + 2 * st + 1, l_i, mask=mask_c)
            tl.store(acc_ptr + st[:, None] * D + offs_d[None, :], acc, mask=mask_c[:, None] & mask_d[None, :])
            tl.debug_barrier()            # the next block's gathers read what this chunk wrote
        j = tl.min(tl.where(sel_w > j, sel_w, NONE))

    # ---- 2. out = acc / l, lse = ln(sum exp(scaled scores)), BLOCK_M rows at a time; rows with no key: 0 and -inf
    for t0 in range(0, WINDOW, BLOCK_M):
        offs_m = w0 + t0 + offs_b                         # query positions inside the sequence
        mask_m = offs_m < seq_len
        rows = row0 + t0 + offs_b
        ids = tl.load(i_base + rows[:, None] * stride_in + kslot[None, :] * stride_ik,
                      mask=mask_m[:, None] & (kslot < K)[None, :], other=-1)
        seen = tl.max(((ids >= 0) & (ids <= (offs_m // BLOCK_SIZE)[:, None])).to(tl.int32), 1) > 0
        st = state0 + t0 + offs_b
        m_i = tl.load(ml_ptr + 2 * st, mask=seen, other=float("-inf"), cache_modifier=".cg")
        l_i = tl.load(ml_ptr + 2 * st + 1, mask=seen, other=0.0, cache_modifier=".cg")
        acc = tl.load(acc_ptr + st[:, None] * D + offs_d[None, :], mask=seen[:, None] & mask_d[None, :],
                      other=0.0, cache_modifier=".cg")
        empty = l_i == 0.0
        l_use = tl.where(empty, 1.0, l_i)
        o = acc / l_use[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_use)) * 0.6931471805599453)
        lse = tl.where(m_i == float("inf"), float("inf"), lse)   # a +inf score: lse +inf (out is NaN, as softmax's)
        tl.store(out_ptr + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_on
                 + offs_d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
        tl.store(lse_ptr + b64 * stride_lb + h64 * stride_lh + rows * stride_ln, lse, mask=mask_m)
