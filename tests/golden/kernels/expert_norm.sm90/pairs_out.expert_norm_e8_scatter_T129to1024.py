# moec kernel expert_norm_e8_scatter_T129to1024
# IR node: %pairs_out: f32[2*T, 64] = expert_norm(y=%ys, w=%w_expert_norm, offsets=%offsets, order=%order, weights=%weights) {eps=1e-06, scatter=True, tiles={128: RowTile(block_t=32, block_d=64, num_warps=4, num_stages=1), 1024: RowTile(block_t=16, block_d=64, num_warps=4, num_stages=1), None: RowTile(block_t=32, block_d=64, num_warps=4, num_stages=1)}}
# expert norms: rows y [R, 64] grouped by expert (offsets, 8 experts), each RMS-normalised in
# fp32 (eps=1e-06) and scaled by its expert's row of w [E, 64]; with SCATTER: times its pair's routing weight, stored at row order[i] (pair-major, for the top-k reduce)
# tile (129 <= T <= 1024): BLOCK_T=16 BLOCK_D=64 num_warps=4 num_stages=1
#
# One program takes BLOCK_T rows: their experts from the offsets, the sum of squares over hidden chunks of
# BLOCK_D, then the normalised, scaled chunks. Variants are tl.constexpr flags.
import triton
import triton.language as tl


@triton.jit
def expert_norm_e8_scatter_T129to1024(
    y_ptr, w_ptr, off_ptr, order_ptr, wts_ptr, out_ptr,
    R,
    stride_ym, stride_yd,
    stride_we, stride_wd,
    stride_om, stride_od,
    D: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, EPS: tl.constexpr, SCATTER: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    kept = tl.load(off_ptr + E)
    in_rows = offs_t < R
    mask_t = offs_t < kept
    rows = offs_t.to(tl.int64)
    # each row's expert: how many experts' rows end at or before it
    offs_e = tl.arange(0, E_PAD)
    ends = tl.load(off_ptr + 1 + offs_e, mask=offs_e < E, other=2147483647)
    e = tl.sum((ends[None, :] <= offs_t[:, None]).to(tl.int32), 1)
    e = tl.minimum(e, E - 1).to(tl.int64)

    ss = tl.zeros((BLOCK_T,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = mask_t[:, None] & (cols < D)[None, :]
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :].to(tl.int64) * stride_yd, mask=m,
                    other=0.0).to(tl.float32)
        ss += tl.sum(y * y, 1)
    rstd = 1.0 / tl.sqrt(ss / D + EPS)
    if SCATTER:     # the combine folded in: the pair's weight, at the pair's row
        pair = tl.load(order_ptr + rows, mask=mask_t, other=0).to(tl.int64)
        rstd = rstd * tl.load(wts_ptr + pair, mask=mask_t, other=0.0)
        dst = pair
        store = mask_t
    else:
        dst = rows
        store = in_rows
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cm = (cols < D)[None, :]
        y = tl.load(y_ptr + rows[:, None] * stride_ym + cols[None, :].to(tl.int64) * stride_yd,
                    mask=mask_t[:, None] & cm, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + e[:, None] * stride_we + cols[None, :].to(tl.int64) * stride_wd,
                     mask=mask_t[:, None] & cm, other=0.0).to(tl.float32)
        out = tl.where(mask_t[:, None], y * rstd[:, None] * wv, 0.0)
        tl.store(out_ptr + dst[:, None] * stride_om + cols[None, :].to(tl.int64) * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=store[:, None] & cm)
