# moec kernel grouped_gemm_linear_T1to128
# IR node: %shared_out: f32[T, 64] = grouped_gemm(a=%shared_h, w=%shared_down) {num_experts=1, out_dtype='f32', tiles={128: GemmTile(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=5, group_m=8), 1024: GemmTile(block_m=32, block_n=16, block_k=32, num_warps=4, num_stages=5, group_m=8), None: GemmTile(block_m=128, block_n=32, block_k=32, num_warps=4, num_stages=5, group_m=8)}}
# grouped GEMM over E=1 experts: out[r, :] = epilogue(A[row(r), :] @ W[e(r)]^T), W[e]: [N=64, K=32]
# variant: activation=None glu=False bias=False bias_up=False gather_top_k=0 scatter=False scale=False scale_in=False store_pre=False out=float32
# tile (T <= 128): BLOCK_M=16 BLOCK_N=16 BLOCK_K=32 GROUP_M=8 num_warps=4 num_stages=5
#
# Rows r are (token, expert) pairs in expert-sorted order (`order`, `offsets` from moec.runtime.dispatch).
# Tiles: row tiles x N tiles in grouped order: GROUP_M row tiles fastest, then the N tiles, then the next
# group (the group's rows stay in L2 while weight columns stream). A tile's expert and rows come from the tile
# schedule when HAS_SCHEDULE (written by the dispatch: three loads), else from a scan of all E offsets.
# PERSISTENT=False: one program per tile, a grid of ROW_TILES (an upper bound fixed by M and E) x N tiles,
# programs past the schedule's tile count exit. PERSISTENT=True: a grid of about one program per resident slot,
# each looping over tiles pid, pid + programs, ... up to the schedule's count (no surplus programs, one prologue).
# Tiles never cross experts. Prologue: GATHER_TOP_K > 0 reads A row order[r] // GATHER_TOP_K (the permute).
# GLU_INTERLEAVED (set at launch when w and w_up are the even and odd rows of one tensor, GPT-OSS's gate_up):
# one contiguous [BLOCK_K, 2 BLOCK_N] load split into the gate and up tiles, instead of two stride-2 loads.
# W_DESC (set at launch, sm90+, when the weights' layout allows): w_ptr / wup_ptr are TMA tensor descriptors
# over [E, N, K] (1) or [E, K, N] (2) and the weight tiles are bulk copies into shared memory (no address math,
# zero fill past N and K); gathered activation rows stay pointer loads.
# Epilogue (fp32): the per-row scale (SCALE) on the accumulators when SCALE_IN ((s A) @ W = s (A @ W): experts whose
# input the routing weight scales), biases, then with STORE_PRE the pre-activations (gate and up, for a backward
# that saves them rather than recomputing them), activation, GLU product with the up projection, else the per-row
# scale, then the store: at row order[r] when SCATTER (the un-permute), else at row r. Rows past offsets[E]
# (dropped pairs) are not written.
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
def _weight_tile(w, ptrs, expert, n0, k0, mask_k, mask_n, W_DESC: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of W[expert]^T: by TMA from a tensor descriptor over [E, N, K] (W_DESC=1) or
    [E, K, N] (W_DESC=2), zero past the expert's N and K; else by pointers, masked."""
    if W_DESC == 1:
        tile = tl.trans(tl.reshape(w.load([expert, n0, k0]), (BLOCK_N, BLOCK_K)))
    elif W_DESC == 2:
        tile = tl.reshape(w.load([expert, k0, n0]), (BLOCK_K, BLOCK_N))
    else:
        tile = tl.load(ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
    return tile


@triton.jit
def _tile(
    pid_n, expert, row0, row_end,
    a_ptr, w_ptr, wup_ptr, out_ptr, pre_ptr, pre_up_ptr, order_ptr, scale_ptr, bias_ptr, bias_up_ptr,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_ue, stride_un, stride_uk,
    stride_om, stride_on,
    stride_be, stride_bn, stride_bue, stride_bun,
    N: tl.constexpr, K: tl.constexpr,
    GATHER_TOP_K: tl.constexpr, SCATTER: tl.constexpr,
    SCALE: tl.constexpr, SCALE_IN: tl.constexpr, GLU: tl.constexpr, GLU_INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS_UP: tl.constexpr, STORE_PRE: tl.constexpr, W_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile of one expert: rows [row0, row_end) of the sorted pairs."""
    e64 = expert.to(tl.int64)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    if GATHER_TOP_K > 0 or SCATTER:
        pair = tl.load(order_ptr + offs_m, mask=mask_m, other=0)
    if GATHER_TOP_K > 0:
        a_rows = pair // GATHER_TOP_K
    else:
        a_rows = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    if W_DESC == 0:
        w_ptrs = w_ptr + e64 * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    else:               # w_ptr, wup_ptr: tensor descriptors (TMA); no pointers to step
        w_ptrs = w_ptr
        u_ptrs = wup_ptr
    if GLU_INTERLEAVED:   # gate and up: even and odd rows of one [E, 2N, K] weight (wup_ptr), one load
        offs_n2 = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
        mask_n2 = offs_n2 < 2 * N
        u_ptrs = wup_ptr + e64 * stride_ue + offs_n2.to(tl.int64)[None, :] * stride_un + offs_k[:, None] * stride_uk
    elif GLU and W_DESC == 0:
        u_ptrs = wup_ptr + e64 * stride_ue + offs_n.to(tl.int64)[None, :] * stride_un + offs_k[:, None] * stride_uk
    if GLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)

    # ---- main loop: fp32 accumulation; fp32 operands use exact (ieee) products
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if GLU_INTERLEAVED:
            wu = tl.load(u_ptrs, mask=mask_k[:, None] & mask_n2[None, :], other=0.0)
            b, u = tl.split(tl.reshape(wu, (BLOCK_K, BLOCK_N, 2)))
        else:
            b = _weight_tile(w_ptr, w_ptrs, expert, pid_n * BLOCK_N, k0, mask_k, mask_n, W_DESC, BLOCK_N, BLOCK_K)
        if a.dtype != b.dtype:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if GLU:
            if not GLU_INTERLEAVED:
                u = _weight_tile(wup_ptr, u_ptrs, expert, pid_n * BLOCK_N, k0, mask_k, mask_n, W_DESC, BLOCK_N,
                                 BLOCK_K)
            if a.dtype != u.dtype:
                a = a.to(tl.float32)
                u = u.to(tl.float32)
            if a.dtype == tl.float32:
                acc_up = tl.dot(a, u, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, u, acc_up)
            if W_DESC == 0:
                u_ptrs += BLOCK_K * stride_uk
        a_ptrs += BLOCK_K * stride_ak
        if W_DESC == 0:
            w_ptrs += BLOCK_K * stride_wk

    # ---- epilogue, in fp32
    if SCALE:           # the rows' weights: on the accumulators with SCALE_IN, else on the output
        if GATHER_TOP_K > 0 or SCATTER:
            s = tl.load(scale_ptr + pair, mask=mask_m, other=0.0).to(tl.float32)
        else:
            s = tl.load(scale_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    if SCALE_IN:
        acc = acc * s[:, None]
        if GLU:
            acc_up = acc_up * s[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + e64 * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if HAS_BIAS_UP:
        bias_up = tl.load(bias_up_ptr + e64 * stride_bue + offs_n * stride_bun, mask=mask_n, other=0.0)
        acc_up += bias_up.to(tl.float32)[None, :]
    if SCATTER:
        out_rows = pair
    else:
        out_rows = offs_m
    out_offs = out_rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    mask_out = mask_m[:, None] & mask_n[None, :]
    if STORE_PRE:       # pre_ptr / pre_up_ptr have out's strides
        tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask_out)
        if GLU:
            tl.store(pre_up_ptr + out_offs, acc_up.to(pre_up_ptr.dtype.element_ty), mask=mask_out)
    x = acc
    if GLU:
        acc = (x) * (acc_up)
    else:
        acc = x
    if SCALE and not SCALE_IN:
        acc = acc * s[:, None]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def grouped_gemm_linear_T1to128(
    a_ptr, w_ptr, wup_ptr, out_ptr, pre_ptr, pre_up_ptr, offsets_ptr, sched_ptr, order_ptr, scale_ptr, bias_ptr,
    bias_up_ptr,
    M, ROW_TILES,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_ue, stride_un, stride_uk,
    stride_om, stride_on,
    stride_be, stride_bn, stride_bue, stride_bun,
    N: tl.constexpr, K: tl.constexpr,
    NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr,
    HAS_OFFSETS: tl.constexpr, HAS_SCHEDULE: tl.constexpr, PERSISTENT: tl.constexpr,
    GATHER_TOP_K: tl.constexpr, SCATTER: tl.constexpr,
    SCALE: tl.constexpr, SCALE_IN: tl.constexpr, GLU: tl.constexpr, GLU_INTERLEAVED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS_UP: tl.constexpr, STORE_PRE: tl.constexpr, W_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_cols = tl.cdiv(N, BLOCK_N)
    lo = 0      # (the scan's vectors: set without a schedule)
    hi = 0
    tiles = 0
    ends = 0
    if HAS_SCHEDULE:
        row_tiles = tl.load(sched_ptr)
    elif HAS_OFFSETS:
        lo, hi, tiles, ends = _expert_tiles(offsets_ptr, NUM_EXPERTS, E_PAD, BLOCK_M)
        row_tiles = tl.sum(tiles, 0)
    else:
        row_tiles = tl.cdiv(M, BLOCK_M)
    if PERSISTENT:
        for t in range(pid, row_tiles * n_cols, tl.num_programs(0)):
            pid_m, pid_n = _grouped_tile(t, row_tiles, n_cols, GROUP_M)
            expert, row0, row_end = _tile_rows(pid_m, sched_ptr, M, lo, hi, tiles, ends, HAS_SCHEDULE, HAS_OFFSETS,
                                               E_PAD, BLOCK_M)
            _tile(pid_n, expert, row0, row_end, a_ptr, w_ptr, wup_ptr, out_ptr, pre_ptr, pre_up_ptr, order_ptr,
                  scale_ptr, bias_ptr, bias_up_ptr, stride_am, stride_ak, stride_we, stride_wn,
                  stride_wk, stride_ue, stride_un, stride_uk, stride_om, stride_on, stride_be,
                  stride_bn, stride_bue, stride_bun, N, K, GATHER_TOP_K, SCATTER, SCALE, SCALE_IN, GLU,
                  GLU_INTERLEAVED, HAS_BIAS, HAS_BIAS_UP, STORE_PRE, W_DESC, BLOCK_M, BLOCK_N,
                  BLOCK_K)
    else:
        pid_m, pid_n = _grouped_tile(pid, ROW_TILES, n_cols, GROUP_M)
        if pid_m < row_tiles:
            expert, row0, row_end = _tile_rows(pid_m, sched_ptr, M, lo, hi, tiles, ends, HAS_SCHEDULE, HAS_OFFSETS,
                                               E_PAD, BLOCK_M)
            _tile(pid_n, expert, row0, row_end, a_ptr, w_ptr, wup_ptr, out_ptr, pre_ptr, pre_up_ptr, order_ptr,
                  scale_ptr, bias_ptr, bias_up_ptr, stride_am, stride_ak, stride_we, stride_wn,
                  stride_wk, stride_ue, stride_un, stride_uk, stride_om, stride_on, stride_be,
                  stride_bn, stride_bue, stride_bun, N, K, GATHER_TOP_K, SCATTER, SCALE, SCALE_IN, GLU,
                  GLU_INTERLEAVED, HAS_BIAS, HAS_BIAS_UP, STORE_PRE, W_DESC, BLOCK_M, BLOCK_N,
                  BLOCK_K)
