# moec kernel grouped_wgrad_gather_T1to128
# IR node: %d_w_gate: bf16[8, 32, 64] = grouped_wgrad(a=%d_gate_rows, b=%x, offsets=%offsets, order=%order) {num_experts=8, gather_b=2, tiles={128: GemmTile(block_m=64, block_n=32, block_k=64, num_warps=4, num_stages=3, group_m=8), None: GemmTile(block_m=128, block_n=16, block_k=64, num_warps=4, num_stages=3, group_m=8)}}
# grouped weight gradient over E=8 experts: out[e] = sum over expert e's rows r of A[row_a(r), :]^T B[row_b(r), :], out[e]: [N=32, K=64]
# variant: gather_a=0 gather_b=2 scale=False dbias=False out=bfloat16
# tile (T <= 128): BLOCK_M=64 BLOCK_N=32 BLOCK_K=64 num_warps=4 num_stages=3
#
# One program per (expert, N tile, K tile); it reduces over its expert's rows offsets[e]:offsets[e+1] (a
# different count per expert) BLOCK_M at a time, in fp32, and writes the expert's tile once (zeros for an
# expert no row reached): deterministic, no atomics. Prologue: GATHER_A / GATHER_B > 0 read row
# order[r] // GATHER of A / B (token rows, never permuted in memory); SCALE multiplies A's row r by
# scale[order[r]] (the routing weight), or scale[r] without offsets. DBIAS: the K-tile-0 programs also
# write dbias[e] = the column sums of A over the expert's rows (the bias gradient).
import triton
import triton.language as tl


@triton.jit
def grouped_wgrad_gather_T1to128(
    a_ptr, b_ptr, out_ptr, dbias_ptr, offsets_ptr, order_ptr, scale_ptr,
    M,
    stride_am, stride_an,
    stride_bm, stride_bk,
    stride_oe, stride_on, stride_ok,
    stride_de, stride_dn,
    N: tl.constexpr, K: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE: tl.constexpr, DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_k = tl.cdiv(K, BLOCK_K)
    expert = pid // (tiles_n * tiles_k)
    pid_n = (pid // tiles_k) % tiles_n
    pid_k = pid % tiles_k
    if HAS_OFFSETS:
        lo = tl.load(offsets_ptr + expert)
        hi = tl.load(offsets_ptr + expert + 1)
    else:
        lo = 0
        hi = M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if DBIAS:
        db = tl.zeros((BLOCK_N,), tl.float32)

    # ---- main loop over the expert's rows
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < hi
        if HAS_OFFSETS and (GATHER_A > 0 or GATHER_B > 0 or SCALE):
            pair = tl.load(order_ptr + offs_m, mask=mask_m, other=0)
        else:
            pair = offs_m
        if GATHER_A > 0:
            a_rows = pair // GATHER_A
        else:
            a_rows = offs_m
        if GATHER_B > 0:
            b_rows = pair // GATHER_B
        else:
            b_rows = offs_m
        a = tl.load(a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + offs_n[None, :] * stride_an,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows.to(tl.int64)[:, None] * stride_bm + offs_k[None, :] * stride_bk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if SCALE:
            s = tl.load(scale_ptr + pair, mask=mask_m, other=0.0)
            a = (a.to(tl.float32) * s.to(tl.float32)[:, None]).to(a.dtype)
        if DBIAS:
            db += tl.sum(a.to(tl.float32), 0)
        if a.dtype != b.dtype:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)

    e64 = expert.to(tl.int64)
    out_ptrs = out_ptr + e64 * stride_oe + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
    if DBIAS:
        if pid_k == 0:
            tl.store(dbias_ptr + e64 * stride_de + offs_n * stride_dn, db.to(dbias_ptr.dtype.element_ty), mask=mask_n)
