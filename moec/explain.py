"""`explain()`: which regions moec lifted, what it generated for them, and what stayed eager, why.

Every region reports itself (`moec.region.Region.report`: the lifted code, each compiled program's
kernels and tiles, calls by what served them); this module puts the model's report together, and
says once for all the modules whose reports are the same (``model.layers.0-7.mlp``: one entry).
"""
from __future__ import annotations

import re


def report(model) -> str:
    info = model.__dict__.get("_moec_report")
    if info is None:
        return f"{type(model).__name__} was not compiled by moec"
    return "\n".join([f"moec report for {info['root']}"] + [f"  {line}" for line in entries(info)] +
                     ["  everything else runs as eager PyTorch"])


def entries(info: dict) -> list[str]:
    """The report's lines without its head and tail (`moec.api` joins several models' for a function)."""
    found = [(q, cls, region.report(q, cls)) for q, cls, region in info["regions"]]
    for q, cls, reason in info["skipped"]:
        # an eager block's experts module that runs on the kernels, in its block's entry
        served = [f"  {line}" for eq, ecls, r in info.get("experts", ()) if r.block == q for line in r.report(eq, ecls)]
        found.append((q, cls, [f"EAGER   {q or '<root>'} ({cls}): {reason}"] + served))
    found += [(q, cls, region.report(q, cls)) for q, cls, region in info.get("moba", ())]
    found = [f for f in found if f[2]]
    if not found:
        return ["no MoE layer found (nor a MoBA core): the whole module runs as eager PyTorch"]
    lines = []
    for names, cls, body in _grouped(found):
        where = f"{_names(names)} ({cls})"
        head = body[0].replace(f"{names[0] or '<root>'} ({cls})", where, 1)
        rest = body[1:]
        if len(names) > 1:
            head += f"  [{len(names)} modules, one report]"
            if names[0]:            # the first module's name in the lines under it names them all
                rest = [line.replace(names[0], _names(names)) for line in rest]
        lines += [head] + rest
    return lines


def _grouped(found: list) -> list:
    """Runs of modules of one class whose reports differ only in the module's name."""
    groups: list = []
    for q, cls, body in found:
        key = (cls, [line.replace(q or "<root>", "") for line in body])
        if groups and groups[-1][0] == key:
            groups[-1][1].append(q)
        else:
            groups.append((key, [q], body))
    return [(names, key[0], body) for key, names, body in groups]


def _names(names: list) -> str:
    """``model.layers.0-7.mlp`` for names that differ in one number that counts up by one, else all."""
    if len(names) == 1:
        return names[0] or "<root>"
    parts = [re.split(r"(\d+)", n) for n in names]
    shapes = {tuple(p if i % 2 == 0 else "#" for i, p in enumerate(ps)) for ps in parts}
    if len(shapes) == 1:
        diff = [i for i in range(len(parts[0])) if len({ps[i] for ps in parts}) > 1]
        if len(diff) == 1:
            nums = [int(ps[diff[0]]) for ps in parts]
            if nums == list(range(nums[0], nums[0] + len(nums))):
                ps = list(parts[0])
                ps[diff[0]] = f"{nums[0]}-{nums[-1]}"
                return "".join(ps)
    return ", ".join(n or "<root>" for n in names)
