# moec kernel grouped_dgrad_gather_silu_glu_variant_T129to1024
# IR node: %d_gate_rows: bf16[2*T, 32], %d_up_rows: bf16[2*T, 32], %h_re: bf16[2*T, 32], %dots: f32[2*T, 2] = grouped_dgrad(a=%dy, w=%w_down, offsets=%offsets, order=%order, gate=%gate_re, up=%up_re, scale=%route_weights) {num_experts=8, gather_top_k=2, act_grad=True, activation='silu', glu=True, glu_limit=10.0, tiles={128: GemmTile(block_m=16, block_n=16, block_k=64, num_warps=4, num_stages=5, group_m=8), 1024: GemmTile(block_m=32, block_n=16, block_k=64, num_warps=4, num_stages=5, group_m=8), None: GemmTile(block_m=128, block_n=32, block_k=64, num_warps=4, num_stages=5, group_m=8)}}
# grouped GEMM of a backward over E=8 experts: acc[r, :] = A[row(r), :] @ W[e(r)]^T, W[e]: [N=32, K=64]
# variant: gather_top_k=2 two=False act_grad=True activation=silu glu=True scale=True scale_in=False store_h=True scatter=False out=bfloat16
# tile (129 <= T <= 1024): BLOCK_M=32 BLOCK_N=16 BLOCK_K=64 GROUP_M=8 num_warps=4 num_stages=5
#
# W is the forward's weight read through strides (a transposed view: no copy). Rows r are (token, expert)
# pairs in expert-sorted order (`order`, `offsets`), programs as in the forward grouped GEMM.
# Prologue: GATHER_TOP_K > 0 reads A row order[r] // GATHER_TOP_K (the output gradient, not permuted in memory).
# TWO: a second product A2 @ W2^T summed into the same accumulator (d input = d gate @ W_gate + d up @ W_up).
# ACT_GRAD epilogue (fp32): acc is d h, the gradient of the activation's output before the routing weight;
# it reads the forward's pre-activation gate (and up) at the same rows, writes h (STORE_H: the down
# projection's input, for its weight gradient), the partial dot sum_n acc * h per N tile (the routing
# weight's gradient, summed over the tiles by the next step: deterministic), then scales by the routing weight
# and writes d gate (and d up). SCALE_IN (experts whose input the routing weight s scales: h = act(s gate) *
# (s up), not scaled after): acc is d h as it is, d gate / d up are s times the gradients at s gate / s up, and
# the partial dots are d s = sum_n (d(s gate) gate + d(s up) up). Else: acc is stored, at row order[r] when
# SCATTER. Rows past offsets[E] (dropped pairs) are not written.
import triton
import triton.language as tl


@triton.jit
def _grouped_tile(t, row_tiles, n_cols, GROUP_M: tl.constexpr):
    """Tile number t -> (row tile, N tile) in grouped order."""
    in_group = GROUP_M * n_cols
    first_m = (t // in_group) * GROUP_M
    group_rows = tl.minimum(row_tiles - first_m, GROUP_M)
    return first_m + (t % in_group) % group_rows, (t % in_group) // group_rows


@triton.jit
def _expert_tiles(offsets_ptr, NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Without a schedule: every expert's rows [lo, hi) and its row tiles' end (a cumsum over the experts)."""
    e_idx = tl.arange(0, E_PAD)
    e_ok = e_idx < NUM_EXPERTS
    lo = tl.load(offsets_ptr + e_idx, mask=e_ok, other=0)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=e_ok, other=0)
    tiles = tl.cdiv(hi - lo, BLOCK_M)
    return lo, hi, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _tile_rows(pid_m, sched_ptr, M, lo, hi, tiles, ends, HAS_SCHEDULE: tl.constexpr, HAS_OFFSETS: tl.constexpr,
               E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, row end) of row tile pid_m."""
    if HAS_SCHEDULE:
        expert = tl.load(sched_ptr + 1 + pid_m)
        row0 = tl.load(sched_ptr + 1 + M + pid_m)
        row_end = tl.load(sched_ptr + 1 + 2 * M + pid_m)
    elif HAS_OFFSETS:
        expert = tl.sum((ends <= pid_m).to(tl.int32), 0)
        mine = tl.arange(0, E_PAD) == expert             # picks the expert's entry out of each vector
        row_end = tl.sum(tl.where(mine, hi, 0), 0)
        row0 = tl.sum(tl.where(mine, lo + (pid_m - (ends - tiles)) * BLOCK_M, 0), 0)
    else:
        expert = pid_m * 0
        row0 = pid_m * BLOCK_M
        row_end = M
    return expert, row0, row_end


@triton.jit
def grouped_dgrad_gather_silu_glu_variant_T129to1024(
    a_ptr, w_ptr, a2_ptr, w2_ptr, out_ptr, out2_ptr, h_ptr, dot_ptr, gate_ptr, up_ptr,
    offsets_ptr, order_ptr, scale_ptr,
    M, ROW_TILES,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_a2m, stride_a2k,
    stride_w2e, stride_w2n, stride_w2k,
    stride_om, stride_on,
    stride_gm, stride_gn,
    stride_dm,
    N: tl.constexpr, K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, GATHER_TOP_K: tl.constexpr, SCATTER: tl.constexpr, SCALE: tl.constexpr,
    SCALE_IN: tl.constexpr, TWO: tl.constexpr, ACT_GRAD: tl.constexpr, GLU: tl.constexpr, STORE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), ROW_TILES, tl.cdiv(N, BLOCK_N), GROUP_M)
    lo = 0      # (the scan's vectors: set with offsets)
    hi = 0
    tiles = 0
    ends = 0
    if HAS_OFFSETS:
        lo, hi, tiles, ends = _expert_tiles(offsets_ptr, NUM_EXPERTS, E_PAD, BLOCK_M)
        if pid_m >= tl.sum(tiles, 0):              # a surplus program: no tile left
            return
    expert, row0, row_end = _tile_rows(pid_m, offsets_ptr, M, lo, hi, tiles, ends, False, HAS_OFFSETS, E_PAD,
                                       BLOCK_M)       # (no schedule: its pointer is not read)
    e64 = expert.to(tl.int64)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    if GATHER_TOP_K > 0 or SCATTER:
        pair = tl.load(order_ptr + offs_m, mask=mask_m, other=0)
    else:
        pair = offs_m
    if GATHER_TOP_K > 0:
        a_rows = pair // GATHER_TOP_K
    else:
        a_rows = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + e64 * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    if TWO:
        a2_ptrs = a2_ptr + offs_m.to(tl.int64)[:, None] * stride_a2m + offs_k[None, :] * stride_a2k
        w2_ptrs = w2_ptr + e64 * stride_w2e + offs_n.to(tl.int64)[None, :] * stride_w2n + offs_k[:, None] * stride_w2k
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    # ---- main loop: fp32 accumulation; fp32 operands use exact (ieee) products
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if a.dtype != b.dtype:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if TWO:
            a2 = tl.load(a2_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b2 = tl.load(w2_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if a2.dtype != b2.dtype:
                a2 = a2.to(tl.float32)
                b2 = b2.to(tl.float32)
            if a2.dtype == tl.float32:
                acc = tl.dot(a2, b2, acc, input_precision="ieee")
            else:
                acc = tl.dot(a2, b2, acc)
            a2_ptrs += BLOCK_K * stride_a2k
            w2_ptrs += BLOCK_K * stride_w2k
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask = mask_m[:, None] & mask_n[None, :]
    if ACT_GRAD:
        # ---- epilogue: the activation's backward, in fp32
        g_offs = offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
        gate_in = tl.load(gate_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        if SCALE:
            s = tl.load(scale_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
        acc_g = gate_in
        if SCALE_IN:
            acc_g = gate_in * s[:, None]
        x = tl.where(acc_g > 10.0, 10.0, acc_g)
        act = x / (1.0 + tl.exp(-x))
        dact = (1.0 / (1.0 + tl.exp(-x))) * (1.0 + x * (1.0 - 1.0 / (1.0 + tl.exp(-x))))
        if GLU:
            up_in = tl.load(up_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
            acc_up = up_in
            if SCALE_IN:
                acc_up = up_in * s[:, None]
            up = tl.where(acc_up > 10.0, 10.0, tl.where(acc_up < -10.0, -10.0, acc_up))
            h = act * up
        else:
            h = act
        o_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        if STORE_H:
            tl.store(h_ptr + o_offs, h.to(h_ptr.dtype.element_ty), mask=mask)
        if not SCALE_IN:
            part = tl.sum(tl.where(mask, acc * h, 0.0), 1)
            if SCALE:
                acc = acc * s[:, None]
        dgate = acc * dact * tl.where(acc_g > 10.0, 0.0, 1.0)
        if GLU:
            dgate = dgate * up
            dup = acc * act * tl.where((acc_up > 10.0) | (acc_up < -10.0), 0.0, 1.0)
        if SCALE_IN:        # d s, then the gradients of the unscaled gate and up
            part = tl.sum(tl.where(mask, dgate * gate_in, 0.0), 1)
            dgate = dgate * s[:, None]
            if GLU:
                part += tl.sum(tl.where(mask, dup * up_in, 0.0), 1)
                dup = dup * s[:, None]
        tl.store(dot_ptr + pair.to(tl.int64) * stride_dm + pid_n, part, mask=mask_m)
        if GLU:
            tl.store(out2_ptr + o_offs, dup.to(out2_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + o_offs, dgate.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if SCATTER:
            out_rows = pair
        else:
            out_rows = offs_m
        out_ptrs = out_ptr + out_rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
