"""`explain()`: which regions moec lifted, what it generated for them, and what stayed eager, why.

Every region reports itself (`moec.region.Region.report`: the lifted code, each compiled program's
kernels and tiles, calls by what served them); this module puts the model's report together.
"""
from __future__ import annotations


def report(model) -> str:
    info = model.__dict__.get("_moec_report")
    if info is None:
        return f"{type(model).__name__} was not compiled by moec"
    lines = [f"moec report for {info['root']}"]
    moe = [line for q, cls, region in info["regions"] for line in region.report(q, cls)]
    moba = [line for q, cls, region in info.get("moba", ()) for line in region.report(q, cls)]
    if not moe and not info["skipped"] and not moba:
        lines.append("  no MoE layer found (nor a MoBA core): the whole module runs as eager PyTorch")
    lines += [f"  {line}" for line in moe]
    lines += [f"  EAGER   {qualname or '<root>'} ({cls}): {reason}" for qualname, cls, reason in info["skipped"]]
    lines += [f"  {line}" for line in moba]
    lines.append("  everything else runs as eager PyTorch")
    return "\n".join(lines)
