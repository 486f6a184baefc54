"""The reporting half of ``benchmarks/moe.py``: pure functions of the result rows, so it needs no GPU.

- moec's performance targets per (model, moec variant): within 1.2x of the roofline floor for T >= 1024,
  within 1.5x for T <= 16, and faster than every peer at every T of 1 ... 16384 (PASS, FAIL or
  not measured; CPU rows are never judged);
- the output: times in milliseconds, the markdown table, the plot (with matplotlib), the JSON /
  CSV / text files of a run and the MISMATCH check that fails it;
- ``--merge``: the per-step JSON files of ``benchmarks/run_gpu.sh`` joined into one row per
  (model, T) with every method of every run (``moe_<arch>_summary.*``).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

TOKENS = (1, 16, 128, 1024, 4096, 16384)
MOEC_METHODS = ("moec", "moec+graph")
PEERS = ("eager", "compile", "grouped_mm")
METHODS = (*MOEC_METHODS, *PEERS)
TUNED = "[tuned]"               # suffix of moec methods from a run with tuned tiles (--merge)


# ---- targets (pure functions of rows) ------------------------------------------------------------

FLOOR_TARGETS = (            # (name, which T it applies to, most moec time / floor allowed)
    ("floor T>=1024 (1.2x)", lambda T: T >= 1024, 1.2),
    ("floor T<=16 (1.5x)", lambda T: T <= 16, 1.5),
)
PEER_TARGET = "faster than every peer at every T"


def floor_time(flops: float, nbytes: float, peak: Optional[float], bandwidth: Optional[float]) -> Optional[float]:
    """Roofline floor in seconds (None without measured ceilings, i.e. on a CPU)."""
    if not peak or not bandwidth:
        return None
    return max(flops / peak, nbytes / bandwidth)


def is_moec(method: str) -> bool:
    return method.startswith("moec")


def method_time(row: dict, method: str) -> Optional[float]:
    """Seconds of ``method`` if it counts: it ran and its output agreed with eager's."""
    return row.get(f"{method}_s") if row.get(f"{method}_status") == "ok" else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def floor_pct(row: dict, method: str) -> Optional[float]:
    """100 * floor / time: the share of the roofline floor ``method`` reaches (None: not measured)."""
    q = _ratio(row.get("floor_s"), method_time(row, method))
    return 100.0 * q if q is not None else None


def best_peer(row: dict) -> tuple[Optional[str], Optional[float]]:
    """(name, seconds) of the fastest peer whose output agreed with eager's: an INVALID peer
    computed something else, so it is never the one moec has to beat."""
    times = [(t, p) for p in PEERS if (t := method_time(row, p)) is not None]
    return (min(times)[1], min(times)[0]) if times else (None, None)


def row_targets(row: dict, variants) -> dict:
    """The per-row numbers the targets are judged on: best peer, and per moec variant
    ``<v>_over_floor`` and ``<v>_over_best_peer`` (time ratios; < 1 means faster than it)."""
    peer, peer_s = best_peer(row)
    out = {"best_peer": peer, "best_peer_s": peer_s}
    for v in variants:
        out[f"{v}_over_floor"] = _ratio(method_time(row, v), row.get("floor_s"))
        out[f"{v}_over_best_peer"] = _ratio(method_time(row, v), peer_s)
    return out


def _judge(bad: list, missing: list, ok_text: str) -> str:
    """PASS / FAIL / not measured with what decided it: any failure fails; else any gap leaves the
    target not measured (a partial run proves nothing about the T it did not reach)."""
    if bad:
        return "FAIL (" + "; ".join(bad) + ")"
    if missing:
        return "not measured (" + ", ".join(missing) + ")"
    return f"PASS ({ok_text})"


def floor_verdict(rows, variant: str, tokens, applies, limit: float) -> str:
    """Whether moec variant ``variant`` is within ``limit`` x the floor at every T of ``tokens``
    that ``applies``; a wrong moec output fails."""
    by_t = {r["T"]: r for r in rows}
    bad, missing, worst = [], [], 0.0
    for T in (T for T in tokens if applies(T)):
        r = by_t.get(T, {})
        q = _ratio(method_time(r, variant), r.get("floor_s"))
        if r.get(f"{variant}_status") == "invalid":
            bad.append(f"T={T}: wrong output")
        elif q is None:
            missing.append(f"T={T}")
        elif q > limit:
            bad.append(f"T={T}: {q:.2f}x")
        else:
            worst = max(worst, q)
    return _judge(bad, missing, f"worst {worst:.2f}x")


def peer_verdict(rows, variant: str, tokens) -> str:
    """Whether ``variant`` is faster than every peer at every T. A peer whose output disagreed with
    eager's is left out (named in the text); one missing from this torch build is not a peer; one
    that failed or was not run leaves the target not measured."""
    by_t = {r["T"]: r for r in rows}
    bad, missing, invalid = [], [], []
    for T in tokens:
        r = by_t.get(T, {})
        t = method_time(r, variant)
        if r.get(f"{variant}_status") == "invalid":
            bad.append(f"T={T}: wrong output")
            continue
        if t is None:
            missing.append(f"{variant}@T={T}")
            continue
        for p in PEERS:
            status = r.get(f"{p}_status")
            if status == "ok" and r[f"{p}_s"] <= t:
                bad.append(f"T={T}: {p} {t / r[f'{p}_s']:.2f}x faster")
            elif status == "invalid":
                invalid.append(f"{p}@T={T}")
            elif status not in ("ok", "unavailable"):
                missing.append(f"{p}@T={T}")
    text = _judge(bad, missing, "every T")
    return text + (f" [INVALID peers left out: {', '.join(invalid)}]" if invalid else "")


def verdict(rows, variant: str, tokens=TOKENS) -> dict:
    """moec's three performance targets for one model's rows and one moec variant. CPU rows are never
    judged: their times say nothing about a GPU."""
    if not rows or not all(r.get("gpu_timed") for r in rows):
        return {name: "not measured (no GPU timing)" for name in [*(t[0] for t in FLOOR_TARGETS), PEER_TARGET]}
    out = {name: floor_verdict(rows, variant, tokens, applies, limit) for name, applies, limit in FLOOR_TARGETS}
    out[PEER_TARGET] = peer_verdict(rows, variant, tokens)
    return out


def verdicts(rows, methods, tokens=TOKENS) -> dict:
    """{model: {moec variant: verdict}} for every model in ``rows``."""
    models = dict.fromkeys(r["model"] for r in rows)
    return {name: {v: verdict([r for r in rows if r["model"] == name], v, tokens)
                   for v in methods if is_moec(v)} for name in models}


def verdict_lines(table_of_verdicts: dict) -> list[str]:
    """One line per model and moec variant (one verdict for all targets when they agree)."""
    def text(per):
        same = set(per.values())
        return f"all targets: {same.pop()}" if len(same) == 1 else " | ".join(f"{k}: {s}" for k, s in per.items())
    return [f"VERDICT {model} {v}: {text(per)}" for model, by_v in table_of_verdicts.items() for v, per in by_v.items()]


def annotate(row: dict, peak, bandwidth, methods) -> dict:
    """Add the floor, each method's % of it, the target ratios and ``verified`` (every moec
    variant that ran agreed with eager) to a measured row."""
    row["floor_s"] = floor_time(row["flops"], row["bytes"], peak, bandwidth)
    for m in methods:
        row[f"{m}_floor_pct"] = floor_pct(row, m)
    row.update(row_targets(row, [m for m in methods if is_moec(m)]))
    row["verified"] = all(row.get(f"{m}_status") != "invalid" for m in methods if is_moec(m))
    return row


# ---- output -----------------------------------------------------------------------------------------

def error_text(e: BaseException) -> str:
    """An exception in one line (a failed method's note, a failed plot's reason)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def fmt_ms(seconds: Optional[float]) -> str:
    """Milliseconds with 4 significant digits and no exponent (0.02530, 180.7, 18022), no unit
    suffix: every time column and log line says "(ms)", so no number can be misread as us."""
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.{max(0, 3 - math.floor(math.log10(ms)))}f}" if ms > 0 else "0"


def _fmt_x(q: Optional[float]) -> str:
    return "n/a" if q is None else f"{q:.2f}x"


def cell(row: dict, m: str) -> str:
    """A method's table cell: its time in ms, INVALID after it if its output disagreed with
    eager's, n/a if it cannot run here, error if it failed, - if it was not run."""
    status = row.get(f"{m}_status")
    if status is None:
        return "-"
    if status in ("ok", "invalid"):
        return fmt_ms(row[f"{m}_s"]) + (" INVALID" if status == "invalid" else "")
    return "n/a" if status == "unavailable" else "error"


def primary(methods) -> Optional[str]:
    """The moec variant the table's ratio columns are about: plain moec if it ran."""
    variants = [m for m in methods if is_moec(m)]
    return "moec" if "moec" in variants else (variants[0] if variants else None)


def table(rows, methods) -> str:
    """Markdown table: every method's ms, the floor, moec / floor, best valid peer, moec / best
    peer and moec's check against eager."""
    v = primary(methods) or "moec"
    head = ["model", "T", *(f"{m} (ms)" for m in methods), "floor (ms)", f"{v} / floor", "best peer (ms)",
            f"{v} / best peer", "check"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        peer = f"{r['best_peer']} {fmt_ms(r['best_peer_s'])}" if r.get("best_peer") else "n/a"
        err = r.get(f"{v}_vs_eager_rel_err")
        check = "-" if err is None else f"{'ok' if r.get(f'{v}_status') == 'ok' else 'MISMATCH'} ({err:.1e})"
        lines.append(" | ".join([r["model"], str(r["T"]), *(cell(r, m) for m in methods), fmt_ms(r.get("floor_s")),
                                 _fmt_x(r.get(f"{v}_over_floor")), peer, _fmt_x(r.get(f"{v}_over_best_peer")),
                                 check]))
    return "\n".join(lines)


def log_row(row: dict, methods) -> None:
    parts = [f"{m} {cell(row, m)}" for m in methods]
    notes = [f"{m}: {row[f'{m}_note']}" for m in methods if row.get(f"{m}_note")]
    print(f"  {row['model']} T={row['T']} (ms): " + ", ".join(parts) + (f"  [{'; '.join(notes)}]" if notes else ""),
          flush=True)


def plot(rows, methods, path: Path, title: str) -> tuple[Optional[Path], Optional[str]]:
    """Per model a row of two panels: ms per layer call against T (every method's valid points, and
    the floor dashed) and % of the floor against T. Returns (path, None), or (None, why not):
    the caller prints why, so a missing plot never goes unnoticed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install -e '.[bench]')"
    try:
        models = list(dict.fromkeys(r["model"] for r in rows))
        fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
        for (ax_ms, ax_pct), name in zip(axes, models):
            _plot_model(ax_ms, ax_pct, sorted((r for r in rows if r["model"] == name), key=lambda r: r["T"]),
                        methods, name)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as e:                 # a plot must not cost the run its numbers
        return None, f"plotting failed: {error_text(e)}"
    return path, None


def _plot_model(ax_ms, ax_pct, mine, methods, name) -> None:
    for m in [*methods, "floor"]:
        pts = [(r["T"], r["floor_s"] * 1e3 if m == "floor" else method_time(r, m) * 1e3) for r in mine
               if (r.get("floor_s") if m == "floor" else method_time(r, m))]
        invalid = any(r.get(f"{m}_status") == "invalid" for r in mine)
        if pts:
            ax_ms.plot(*zip(*pts), marker="o", linestyle="--" if m == "floor" else "-",
                       color="black" if m == "floor" else None,
                       label=m + (" (INVALID points left out)" if invalid else ""))
    for m in methods:
        pts = [(r["T"], floor_pct(r, m)) for r in mine if floor_pct(r, m) is not None]
        if pts:
            ax_pct.plot(*zip(*pts), marker="o", label=m)
    if not any(r.get("floor_s") for r in mine):
        ax_pct.text(0.5, 0.5, "no floor measured\n(CPU run: no GPU roofline)", ha="center", va="center",
                    transform=ax_pct.transAxes)
    else:
        ax_pct.axhline(100, color="black", linestyle="--", linewidth=1)
        ax_pct.legend(fontsize=8)
    ax_ms.set_xscale("log")
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("ms per layer call")
    ax_pct.set_xscale("log")
    ax_pct.set_ylabel("% of floor (floor / time)")
    for ax, what in ((ax_ms, "time"), (ax_pct, "share of the roofline floor")):
        ax.set_title(f"{name}: {what}")
        ax.set_xlabel("tokens T")
        ax.grid(True, which="both", alpha=0.3)
    ax_ms.legend(fontsize=8)


def write_json(path: Path, meta: dict, rows, verdict_table: Optional[dict] = None) -> None:
    doc = {"meta": meta, "verdicts": verdict_table, "rows": rows}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def finish(rows, meta: dict, methods, out: Path, stem: str) -> int:
    """Annotate the rows, write JSON (rows, meta, verdicts), CSV, the text table and the plot, print
    the table and the verdicts. 1 if any moec variant disagreed with eager or failed to run."""
    for r in rows:
        annotate(r, meta.get("peak_flops"), meta.get("bandwidth_bytes_s"), methods)
    found = verdicts(rows, methods)
    write_json(out / f"{stem}.json", meta, rows, found)
    keys = sorted({k for r in rows for k in r if k not in ("tiles", "methods")})
    with open(out / f"{stem}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    text = table(rows, methods) + "\n\n" + "\n".join(verdict_lines(found))
    (out / f"{stem}.txt").write_text(text + "\n")
    print("\n" + text)
    title = (f"MoE layer forward, bf16, {meta['device']}" if meta.get("gpu_timed") else
             "CPU smoke run (fp32, Triton interpreter): NOT GPU timings")
    png, why = plot(rows, methods, out / f"{stem}.png", title)
    print(f"\nwrote {', '.join(str(out / (stem + e)) for e in ('.json', '.csv', '.txt'))}"
          + (f", {png}" if png else ""))
    if why:
        print(f"PLOT SKIPPED: {why}")
    if not meta.get("gpu_timed"):
        print("GPU timings were NOT measured (CPU run).")
    return _failures(rows, methods)


def _failures(rows, methods) -> int:
    """Print and count moec's failures: a wrong output or a moec method that could not run."""
    bad = [(r["model"], r["T"], m) for r in rows for m in methods
           if is_moec(m) and r.get(f"{m}_status") in ("invalid", "error")]
    invalid_peers = [(r["model"], r["T"], m) for r in rows for m in PEERS if r.get(f"{m}_status") == "invalid"]
    if invalid_peers:
        print(f"WARNING: INVALID peer outputs (disagree with eager; never counted as faster): {invalid_peers}")
    if bad:
        print(f"MISMATCH: moec disagrees with eager or failed on {bad}")
    return 1 if bad else 0


# ---- merging the per-step files ------------------------------------------------------------------

ROW_KEYS = ("model", "T", "dtype", "device", "experts_hit", "flops", "bytes", "gpu_timed", "moec_entry", "tiles")
METHOD_FIELDS = ("s", "status", "note", "vs_eager_rel_err", "first_call_s")
ORDER = ("moec", "moec+graph", "moec" + TUNED, "moec+graph" + TUNED, *PEERS)


def merge_runs(docs) -> tuple[dict, list, list]:
    """(meta, rows, methods): one row per (model, T) holding every method of every run in ``docs``
    (JSON documents, oldest first: a later run's method replaces an earlier one's), so all peers
    and all T of a model land in one table. A tuned run's moec methods get the suffix ``[tuned]``.
    The floor uses the highest peak and bandwidth that any run measured: the strictest floor."""
    merged, methods = {}, []
    for doc in docs:
        suffix = TUNED if doc["meta"].get("tuned") else ""
        for r in doc["rows"]:
            out = merged.setdefault((r["model"], r["T"]), {k: r[k] for k in ROW_KEYS if k in r})
            for m in r.get("methods", []):
                name = m + suffix if is_moec(m) else m
                methods.append(name)
                out.update({f"{name}_{f}": r[f"{m}_{f}"] for f in METHOD_FIELDS if f"{m}_{f}" in r})
    methods = sorted(set(methods), key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    metas = [d["meta"] for d in docs]
    model_order = list(dict.fromkeys(m for m, _ in merged))
    rows = sorted(merged.values(), key=lambda r: (model_order.index(r["model"]), r["T"]))
    meta = {**metas[-1], "merged_from": [m.get("file") for m in metas], "tuned": any(m.get("tuned") for m in metas),
            "peak_flops": max((m["peak_flops"] for m in metas if m.get("peak_flops")), default=None),
            "bandwidth_bytes_s": max((m["bandwidth_bytes_s"] for m in metas if m.get("bandwidth_bytes_s")),
                                     default=None),
            "gpu_timed": all(m.get("gpu_timed") for m in metas)}
    return meta, rows, methods


def load_runs(paths) -> list[dict]:
    """The JSON documents of ``paths`` (a directory: its ``moe_*.json`` except summaries), oldest
    first, from the device of the newest one only: a table mixing two devices (a GPU's and a CPU
    smoke run's) would compare nothing, so the others are named and left out."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("moe_*.json")) if p.is_dir() else [p]
    files = sorted((f for f in files if not f.stem.endswith("_summary")), key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"--merge: no moe_*.json under {list(map(str, paths))}")
    docs = []
    for f in files:
        doc = json.loads(f.read_text())
        doc["meta"]["file"] = f.name
        docs.append(doc)
    device = docs[-1]["meta"].get("device")
    other = [d["meta"]["file"] for d in docs if d["meta"].get("device") != device]
    if other:
        print(f"[merge] left out (not from {device}): {', '.join(other)}")
    return [d for d in docs if d["meta"].get("device") == device]


def merge_main(paths, out: Path) -> int:
    meta, rows, methods = merge_runs(load_runs(paths))
    print(f"[merge] {len(meta['merged_from'])} files: {', '.join(meta['merged_from'])}")
    stem = f"moe_{meta.get('arch') or 'merged'}_summary"
    return finish(rows, meta, methods, out, stem)
