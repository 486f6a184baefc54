# moec kernel moec_route_sigmoid_e8_k2_given_T1to128
# IR node: %ids: i32[T, 2], %weights: f32[T, 2], %order: i32[2*T], %offsets: i32[9], %counts: i32[8], %prob_sum: f32[8], _, _, %offsets_schedule: i32[6*T + 1] = fused_route(logits=%logits, score_bias=%score_bias) {num_experts=8, top_k=2, score='sigmoid', renormalize=True, score_bias=True, aux_loss=True, tiles={128: RouteTile(block_t=32, block_k=16, num_warps=4, num_stages=1), 1024: RouteTile(block_t=16, block_k=16, num_warps=4, num_stages=1), None: RouteTile(block_t=64, block_k=16, num_warps=4, num_stages=1)}, schedule_block_m={128: 16, 1024: 32, None: 128}}
# shapes: logits [T, 8] (given) (padded to E_PAD = 16), ids/weights [T, 2]
# router: score=sigmoid, renormalize=True, routed_scaling=1.0, router_bias=False, score_bias=True, noisy=False, aux_loss=True, shared_gate=False, write_logits=False, write_counts=True
# tile (T <= 128): RouteTile(block_t=32, block_k=16, num_warps=4, num_stages=1) (BLOCK_K used: 16)
#
# Fused routing: one program takes BLOCK_T tokens, computes their logits tile [BLOCK_T, E_PAD]
# with tl.dot over hidden chunks of BLOCK_K (fp32 accumulation), then scores (softmax / sigmoid /
# sqrt(softplus)), selection keys (+ score bias, group-limited), top-k by repeated argmax (ties ->
# lower expert index, NaN ranks first), weights (renormalised, scaled), and per-expert counts
# (atomics). With LOGITS_IN it is given the logits (an external router's: x_ptr points to fp32
# [T, E]) and reads their tile instead of the GEMM. With CHOICES_IN each token's k choices are given
# (a token table's row, int [T, k] at choices_ptr) and weighted instead of ranked; a choice may
# repeat. With DISPATCH (one program holds every token) it also groups the pairs by expert: a
# counting sort from the program's own counts, and with SCHED_M > 0 writes the grouped GEMMs' tile
# schedule for SCHED_M-row tiles. Variants are tl.constexpr flags; Triton prunes the dead ones.
import triton
import triton.language as tl


@triton.jit
def moec_route_sigmoid_e8_k2_given_T1to128(
    x_ptr, w_ptr, b_ptr, sbias_ptr, wn_ptr, noise_ptr, wsg_ptr, choices_ptr,
    ids_ptr, wts_ptr, counts_ptr, psum_ptr, sscale_ptr, logits_ptr, order_ptr, offsets_ptr, sched_ptr,
    T,
    stride_xt, stride_xd,
    stride_we, stride_wd,
    stride_wne, stride_wnd,
    stride_nt, stride_ne,
    stride_sgd,
    D: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    SIGMOID: tl.constexpr, SQRT_SOFTPLUS: tl.constexpr, SELECT_LOGITS: tl.constexpr, RENORMALIZE: tl.constexpr,
    ROUTED_SCALING: tl.constexpr,
    HAS_ROUTER_BIAS: tl.constexpr, HAS_SCORE_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
    HAS_NOISE: tl.constexpr, AUX: tl.constexpr, SHARED_GATE: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    WRITE_COUNTS: tl.constexpr, LOGITS_IN: tl.constexpr, CHOICES_IN: tl.constexpr, DISPATCH: tl.constexpr,
    SCHED_M: tl.constexpr,
    SCHED_S: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    offs_e = tl.arange(0, E_PAD)
    mask_e = offs_e < E
    offs_k = tl.arange(0, BLOCK_K)

    # ---- logits = x @ W^T (and x @ W_noise^T, x . w_shared_gate), fp32 accumulation --------
    acc = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    if HAS_NOISE:
        acc_n = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    if SHARED_GATE:
        acc_g = tl.zeros((BLOCK_T,), tl.float32)
    if LOGITS_IN:   # the logits are given: their tile, read once (no GEMM)
        acc = tl.load(x_ptr + rows[:, None] * stride_xt + offs_e[None, :].to(tl.int64) * stride_xd,
                      mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
    else:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < D
            xt = tl.load(x_ptr + rows[:, None] * stride_xt + kk[None, :].to(tl.int64) * stride_xd,
                         mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            wt = tl.load(w_ptr + offs_e[None, :].to(tl.int64) * stride_we + kk[:, None].to(tl.int64) * stride_wd,
                         mask=mask_k[:, None] & mask_e[None, :], other=0.0)
            if (xt.dtype == wt.dtype) and (xt.dtype != tl.float32):
                acc = tl.dot(xt, wt, acc)
            else:
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            if HAS_NOISE:
                wnt = tl.load(wn_ptr + offs_e[None, :].to(tl.int64) * stride_wne + kk[:, None].to(tl.int64) * stride_wnd,
                              mask=mask_k[:, None] & mask_e[None, :], other=0.0)
                if (xt.dtype == wnt.dtype) and (xt.dtype != tl.float32):
                    acc_n = tl.dot(xt, wnt, acc_n)
                else:
                    acc_n = tl.dot(xt.to(tl.float32), wnt.to(tl.float32), acc_n, input_precision="ieee")
            if SHARED_GATE:
                wg = tl.load(wsg_ptr + kk.to(tl.int64) * stride_sgd, mask=mask_k, other=0.0)
                acc_g += tl.sum(xt.to(tl.float32) * wg.to(tl.float32)[None, :], 1)

    logits = acc
    if HAS_ROUTER_BIAS:
        logits = logits + tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    if WRITE_LOGITS:  # the router's own logits, before any noise
        tl.store(logits_ptr + rows[:, None] * E + offs_e[None, :], logits,
                 mask=mask_t[:, None] & mask_e[None, :])
    if HAS_NOISE:
        # softplus as torch: z > 20 ? z : log1p(exp(z)); log1p(u) = log(1 + u) * u / ((1 + u) - 1)
        u = tl.exp(tl.minimum(acc_n, 20.0))
        one_u = 1.0 + u
        tiny = one_u == 1.0
        lp = tl.where(tiny, u, tl.log(one_u) * (u / tl.where(tiny, 1.0, one_u - 1.0)))
        softplus = tl.where(acc_n > 20.0, acc_n, lp)
        nz = tl.load(noise_ptr + rows[:, None] * stride_nt + offs_e[None, :].to(tl.int64) * stride_ne,
                     mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
        logits = logits + nz * softplus
    if SHARED_GATE:
        tl.store(sscale_ptr + rows, tl.sigmoid(acc_g), mask=mask_t)

    # ---- scores over the E real experts (padded columns: score 0, never selected) -----------
    if SIGMOID:
        scores = tl.where(mask_e[None, :], tl.sigmoid(logits), 0.0)
    elif SQRT_SOFTPLUS:     # sqrt(softplus(z)), softplus as torch computes it (as the noise's above)
        ue = tl.exp(tl.minimum(logits, 20.0))
        one_ue = 1.0 + ue
        tiny_e = one_ue == 1.0
        sp = tl.where(tiny_e, ue, tl.log(one_ue) * (ue / tl.where(tiny_e, 1.0, one_ue - 1.0)))
        scores = tl.where(mask_e[None, :], tl.sqrt(tl.where(logits > 20.0, logits, sp)), 0.0)
    else:
        lm = tl.where(mask_e[None, :], logits, float("-inf"))
        p = tl.where(mask_e[None, :], tl.exp(lm - tl.max(lm, 1)[:, None]), 0.0)
        scores = p * (1.0 / tl.sum(p, 1))[:, None]
    if AUX:
        if SIGMOID or SQRT_SOFTPLUS:
            probs = scores / tl.sum(scores, 1)[:, None]
        else:
            probs = scores
        probs = tl.where(mask_t[:, None] & mask_e[None, :], probs, 0.0)
        if DISPATCH:    # the only program
            tl.store(psum_ptr + offs_e, tl.sum(probs, 0), mask=mask_e)
        else:
            tl.atomic_add(psum_ptr + offs_e, tl.sum(probs, 0), mask=mask_e)

    # ---- selection keys: biased scores (or logits), NaN -> +inf (ranks first), padding -> -inf
    if SELECT_LOGITS:
        keys = logits
    else:
        keys = scores
    if HAS_SCORE_BIAS:
        keys = keys + tl.load(sbias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    keys = tl.where(keys != keys, float("inf"), keys)
    keys = tl.where(mask_e[None, :], keys, float("-inf"))

    if N_GROUP > 1:
        # group score per expert column (every expert of a group carries its group's score)
        PER: tl.constexpr = E // N_GROUP
        grp = offs_e // PER
        gsc = tl.full((BLOCK_T, E_PAD), float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (grp == g)[None, :]
            kg = tl.where(in_g, keys, float("-inf"))
            if GROUP_TOP2:
                # best two keys of the group: drop one copy of the best (a tie keeps the other)
                top1, i1 = tl.max(kg, 1, return_indices=True, return_indices_tie_break_left=True)
                top2 = tl.max(tl.where(offs_e[None, :] == i1[:, None], float("-inf"), kg), 1)
                gs = top1 + top2
                gs = tl.where(gs != gs, float("inf"), gs)   # NaN (inf + -inf) ranks first
            else:
                gs = tl.max(kg, 1)
            gsc = tl.where(in_g, gs[:, None], gsc)
        # keep the TOPK_GROUP best groups (ties -> lower group), picked like the top-k below
        keep = tl.zeros((BLOCK_T, E_PAD), tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            avail = mask_e[None, :] & (keep == 0)
            v = tl.where(avail, gsc, float("-inf"))
            first = tl.min(tl.where(avail & (v == tl.max(v, 1)[:, None]), offs_e[None, :], E_PAD), 1)
            keep = keep | (grp[None, :] == (first // PER)[:, None])
        keys = tl.where(keep, keys, float("-inf"))

    # ---- top-k: K times, the highest key among experts not chosen yet, lower index on ties ---
    # (not tl.argmax: once every key left is -inf it could return an expert already chosen)
    offs_j = tl.arange(0, K_PAD)
    chosen = tl.zeros((BLOCK_T, E_PAD), tl.int32)     # picks per (token, expert): given choices may repeat
    sel_ids = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    sel_w = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    for j in tl.static_range(K):
        if CHOICES_IN:  # the j-th given choice
            idx = tl.load(choices_ptr + rows * K + j, mask=mask_t, other=0).to(tl.int32)
            idx = tl.minimum(tl.maximum(idx, 0), E - 1)    # (checked before the launch; never read outside)
        else:
            avail = mask_e[None, :] & (chosen == 0)
            v = tl.where(avail, keys, float("-inf"))
            idx = tl.min(tl.where(avail & (v == tl.max(v, 1)[:, None]), offs_e[None, :], E_PAD), 1)
            idx = tl.minimum(idx, E - 1)   # always a real expert, whatever the data
        hit = offs_e[None, :] == idx[:, None]
        chosen = chosen + hit.to(tl.int32)
        wj = tl.sum(tl.where(hit, scores, 0.0), 1)
        sel_ids = tl.where(offs_j[None, :] == j, idx[:, None], sel_ids)
        sel_w = tl.where(offs_j[None, :] == j, wj[:, None], sel_w)
    if RENORMALIZE:
        sel_w = sel_w * (1.0 / (tl.sum(sel_w, 1) + 1e-20))[:, None]
    sel_w = sel_w * ROUTED_SCALING

    out_mask = mask_t[:, None] & (offs_j[None, :] < K)
    out_off = rows[:, None] * K + offs_j[None, :]
    tl.store(ids_ptr + out_off, sel_ids, mask=out_mask)
    tl.store(wts_ptr + out_off, sel_w, mask=out_mask)

    # ---- per-expert (token, slot) counts --------------------------------------------------
    chosen = tl.where(mask_t[:, None], chosen, 0)
    cnt = tl.sum(chosen, 0)
    if WRITE_COUNTS:
        if DISPATCH:    # the only program: its counts are the counts
            tl.store(counts_ptr + offs_e, cnt, mask=mask_e)
        else:
            tl.atomic_add(counts_ptr + offs_e, cnt, mask=mask_e & (cnt > 0))

    # ---- dispatch: pairs grouped by expert, stable (token order within an expert) -----------
    # (only when this program holds every token: T <= BLOCK_T, one program)
    if DISPATCH:
        start = tl.cumsum(cnt, 0) - cnt                          # offsets[e]: pairs of experts < e
        tl.store(offsets_ptr + offs_e, start, mask=mask_e)
        tl.store(offsets_ptr + E, tl.sum(cnt, 0))
        slot = start[None, :] + tl.cumsum(chosen, 0) - chosen   # position of token t's first pair with expert e
        seen = tl.zeros((BLOCK_T, E_PAD), tl.int32)            # token t's earlier pairs with e (repeated choices)
        for j in tl.static_range(K):
            idx = tl.sum(tl.where(offs_j[None, :] == j, sel_ids, 0), 1)
            hit = offs_e[None, :] == idx[:, None]
            pos = tl.sum(tl.where(hit, slot + seen, 0), 1)
            seen = seen + hit.to(tl.int32)
            tl.store(order_ptr + pos, (rows * K + j).to(tl.int32), mask=mask_t)
        if SCHED_M > 0:
            M = T * K
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
