# moec kernel reduce_topk_residual_T1025up
# IR node: %d_x: bf16[T, 64] = reduce_topk(y=%dx_rows, ids=%ids, residual=%dx_router_shared) {top_k=2, out_dtype='bf16', tiles={128: RowTile(block_t=32, block_d=64, num_warps=4, num_stages=1), 1024: RowTile(block_t=16, block_d=64, num_warps=4, num_stages=1), None: RowTile(block_t=32, block_d=64, num_warps=4, num_stages=1)}}
# top-k reduce: out[t, :] = sum_{s = 0..k-1, ids[t, s] != -1} y_pairs[t * k + s, :] (+ residual[t, :]); k=2, D=64
# variant: residual=True out=bfloat16; HAS_IDS: skip pairs whose id is -1
# tile (T >= 1025): BLOCK_T=32 BLOCK_D=64 num_warps=4 num_stages=1
#
# The k slots are added in slot order in fp32, then the residual: the same order on every run and every
# GPU (no atomics), so the layer is deterministic. Pairs dropped by capacity (id -1) are never read.
import triton
import triton.language as tl


@triton.jit
def reduce_topk_residual_T1025up(
    y_ptr, ids_ptr, res_ptr, out_ptr,
    T,
    stride_ym, stride_yd,
    stride_it, stride_is,
    stride_rt, stride_rd,
    stride_ot, stride_od,
    D: tl.constexpr, TOP_K: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    rows = offs_t.to(tl.int64)

    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for s in tl.static_range(TOP_K):
        keep = mask_t
        if HAS_IDS:
            e = tl.load(ids_ptr + rows * stride_it + s * stride_is, mask=mask_t, other=-1)
            keep = mask_t & (e >= 0)
        y_ptrs = y_ptr + (rows * TOP_K + s)[:, None] * stride_ym + offs_d[None, :] * stride_yd
        y = tl.load(y_ptrs, mask=keep[:, None] & mask_d[None, :], other=0.0)
        acc += y.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_rt + offs_d[None, :] * stride_rd,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        acc += r.to(tl.float32)
    out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])
