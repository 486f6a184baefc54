# moec kernel tile_schedule_m128
# IR node: %ids: i32[T, 2], %weights: f32[T, 2], %order: i32[2*T], %offsets: i32[9], _, _, _, _, %offsets_schedule: i32[6*T + 1] = fused_route(x=%x, w=%w_router, choices=%choices) {num_experts=8, top_k=2, score='sqrtsoftplus', renormalize=True, routed_scaling=1.5, token_table=True, tiles={1024: RouteTile(block_t=16, block_k=64, num_warps=4, num_stages=3), None: RouteTile(block_t=64, block_k=64, num_warps=4, num_stages=3)}, schedule_block_m={128: 16, 1024: 32, None: 128}}
# tile schedule of a dispatch over E=8 experts for grouped GEMMs of BLOCK_M=128 row tiles
#
# One program reads offsets [E+1] (the pairs grouped by expert, from dispatch) and writes the schedule: the
# number of row tiles, then the expert, first row and row end of each tile, so that a grouped GEMM's program
# reads its tile's three numbers instead of scanning every expert's offsets. (When the routing kernel sorts the
# pairs itself it writes the schedule too; this kernel serves the token counts where torch sorts them.)
import triton
import triton.language as tl


@triton.jit
def tile_schedule_m128(
    offsets_ptr, sched_ptr, M,
    E: tl.constexpr, E_PAD: tl.constexpr, SCHED_M: tl.constexpr, SCHED_S: tl.constexpr,
):
    offs_e = tl.arange(0, E_PAD)
    mask_e = offs_e < E
    start = tl.load(offsets_ptr + offs_e, mask=mask_e, other=0)
    cnt = tl.load(offsets_ptr + offs_e + 1, mask=mask_e, other=0) - start
    # ---- tile schedule for the grouped GEMMs' SCHED_M-row tiles (no program of theirs scans the experts)
    n_tiles_e = (cnt + SCHED_M - 1) // SCHED_M
    tile_end = tl.cumsum(n_tiles_e, 0)                   # expert e owns tiles [tile_end[e] - n_tiles_e[e], tile_end[e])
    tile_start = tile_end - n_tiles_e
    n_tiles = tl.sum(n_tiles_e, 0)
    tl.store(sched_ptr, n_tiles)
    for s0 in range(0, n_tiles, SCHED_S):
        tile = s0 + tl.arange(0, SCHED_S)
        tile_expert = tl.sum((tile_end[None, :] <= tile[:, None]).to(tl.int32), 1)
        mine = offs_e[None, :] == tile_expert[:, None]
        tile_row0 = tl.sum(tl.where(mine, start[None, :] + (tile[:, None] - tile_start[None, :]) * SCHED_M, 0), 1)
        tile_rend = tl.sum(tl.where(mine, start[None, :] + cnt[None, :], 0), 1)
        in_use = tile < n_tiles
        tl.store(sched_ptr + 1 + tile, tile_expert, mask=in_use)
        tl.store(sched_ptr + 1 + M + tile, tile_row0, mask=in_use)
        tl.store(sched_ptr + 1 + 2 * M + tile, tile_rend, mask=in_use)
