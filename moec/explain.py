"""`explain()`: which regions moec lifted, what it generated for them, and what stayed eager, why."""
from __future__ import annotations

from moec.passes.lower import torch_steps


def _spec_line(spec) -> str:
    r = spec.router
    bits = [f"{r.num_experts} experts", f"top-{r.top_k}", r.score]
    if r.order == "topk_then_score":
        bits.append("top-k then softmax")
    if r.renormalize:
        bits.append("renormalised")
    if r.routed_scaling != 1.0:
        bits.append(f"scaled x{r.routed_scaling:g}")
    if r.score_bias:
        bits.append("selection bias")
    if r.n_group > 1:
        bits.append(f"group-limited {r.topk_group}/{r.n_group} ({r.group_score})")
    if r.capacity_factor is not None:
        bits.append(f"capacity {r.capacity_factor:g} ({r.overflow})")
    if r.noisy:
        bits.append("noisy gating")
    if r.aux_loss:
        bits.append("aux loss")
    if r.router_bias:
        bits.append("router bias")
    act = ("SwiGLU" if spec.activation == "silu" else f"{spec.activation} GLU") if spec.glu else spec.activation
    variant = [f"{k}={v:g}" for k, v in spec.glu_variant.items()]
    if variant:
        act += f" ({', '.join(variant)})"
    bits.append(f"{act} experts{' with biases' if spec.expert_bias else ''} d={spec.hidden} f={spec.ffn}")
    if spec.shared is not None:
        bits.append(f"shared expert f={spec.shared.width}" + (" (sigmoid-gated)" if spec.shared.gated else ""))
    return ", ".join(bits)


_SHOWN_NOTES = ("fx trace", "traced router path", "experts:", "shared expert", "probe:")


def report(model) -> str:
    info = model.__dict__.get("_moec_report")
    if info is None:
        return f"{type(model).__name__} was not compiled by moec"
    lines = [f"moec report for {info['root']}"]
    moba = [line for q, cls, region in info.get("moba", ()) for line in region.report(q, cls)]
    if not info["regions"] and not info["skipped"] and not moba:
        lines.append("  no MoE layer found (nor a MoBA core): the whole module runs as eager PyTorch")
    for qualname, cls, region in info["regions"]:
        lines.append(f"  LIFTED  {qualname or '<root>'} ({cls}): {region.lifted.formulation}")
        lines.append(f"          {_spec_line(region.spec)}")
        for note in getattr(region.lifted, "notes", []):
            if note.startswith(_SHOWN_NOTES):          # the rest is in the dump's captured.txt
                lines.append(f"          {note}")
        for (dtype, arch), c in region.compiled.items():
            kernels = ", ".join(f"{s.node.op} {_tiles(s, c)}" for s in c.program.steps if s.variants)
            lines.append(f"          compiled for {str(dtype).split('.')[-1]} on {arch.name}: {kernels}")
            lines += [f"          {line}" for line in _tile_lines(c)]
            torch_ops = torch_steps(c.program)
            if torch_ops:
                lines.append(f"          torch steps (not generated kernels): {', '.join(torch_ops)}")
            lines.append(f"          {_graph_line(c.program)}")
        lines.append("          backward: when gradients are needed the forward runs the kernels and "
                     "the backward runs eager PyTorch (autograd through the reference)")
        for what, n in sorted(region.calls.items()):
            lines.append(f"          calls: {n} x {what}")
    for qualname, cls, reason in info["skipped"]:
        lines.append(f"  EAGER   {qualname or '<root>'} ({cls}): {reason}")
    lines += moba                                  # MoBA regions (`moec.moba.region.MobaRegion.report`)
    lines.append("  everything else runs as eager PyTorch")
    return "\n".join(lines)


def _graph_line(program) -> str:
    if program.graph_safe:
        return "CUDA graphs: a call can be captured (no host synchronisation; buffers and grids sized from T)"
    steps = ", ".join(dict.fromkeys(program.graph_unsafe_steps()))
    return f"CUDA graphs: not capturable: {steps} run the reference's torch code, which synchronises with the host"


def _tiles(step, c) -> str:
    """``[kernel: tile; ...]``, one entry per token-count bucket (the kernel name says which);
    tiles taken from the tune file are marked ``(tuned)``, or ``(partly tuned)`` when only some of
    the buckets the kernel serves have an entry (the others' model tile happened to equal it)."""
    def mark(v):
        source = c.variant_source(step, v)
        return "" if "tune file" not in source else " (tuned)" if source == "tune file" else " (partly tuned)"
    return "[" + "; ".join(f"{v.kernel.fn_name}: {_tile(v.params.tile)}{mark(v)}" for v in step.variants) + "]"


def _tile_lines(c) -> list[str]:
    """Where the program's tiles came from, and every tune entry for this device that was ignored."""
    if c.arch.name == "cpu":
        return []
    if not c.tuned_from:
        lines = [f"tiles: the cost model's for {c.arch.name} (no tune file entries for this device; moec.tune times candidates)"]
    else:
        sources = [src for per_bucket in c.sources.values() for src in per_bucket.values()]
        lines = [f"tiles: {sources.count('tune file')} of {len(sources)} kernel buckets from the tune file "
                 f"({c.tuned_from}), the rest the cost model's"]
    return lines + [f"tune file entry ignored: {note}" for note in c.tune_notes]


def _tile(t) -> str:
    d = t.as_dict()
    return "x".join(str(v) for k, v in d.items() if k.startswith("block")) + f" w{d['num_warps']} s{d['num_stages']}"
