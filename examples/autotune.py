"""Autotune a compiled MoE layer, keep the winners in a tune file, and see the layer use them.

    python examples/autotune.py               # CPU: the flow only (interpreter, a stand-in timer)
    python examples/autotune.py --bf16        # a CUDA GPU: real timings (triton.testing.do_bench)

`moec.tune(model, x)` times, for every lifted MoE layer, each kernel's current tile and the cost
model's next best ones per token-count bucket, prints a line per candidate as it goes, and merges
the winners into the tune file (``--tune-file``, else ``MOEC_TUNE_FILE``, else moec's cache dir):
per device, kernel and bucket. Ship that file with a model and point ``MOEC_TUNE_FILE`` at it.
The layer, compiled before, recompiles once at its next call with the tuned tiles, and
``explain()`` marks them ``(tuned)``.

Without a GPU there is nothing real to time: the script compiles the layer for sm90's tiles (run
in the Triton interpreter), times the interpreter with the wall clock (meaningless for a GPU),
and files the entries under a made-up device name that ``MOEC_TUNE_DEVICE`` then selects, in a
temporary tune file (removed at exit) unless ``--tune-file`` names one: made-up entries do not
belong in a real one.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import moec
from moec import autotune


class Expert(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Mixtral-style: softmax router, top-k, renormalise, a loop over SwiGLU experts."""

    def __init__(self, d, f, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, f) for _ in range(num_experts))

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        weights, selected = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=len(self.experts)).permute(2, 1, 0)
        for i, expert in enumerate(self.experts):
            slot, token = torch.where(mask[i])
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out


def wall_clock(fn) -> float:
    """The CPU stand-in for do_bench: one interpreted run, timed (shows the flow, not GPU speed)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", action="store_true", help="bf16 on a CUDA GPU, timed with do_bench")
    ap.add_argument("--tune-file", default=None,
                    help="where the winners go (default: MOEC_TUNE_FILE, else moec's cache dir on a GPU, "
                         "a temporary file without one)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if args.bf16 and not cuda:
        raise SystemExit("--bf16 needs a CUDA GPU")
    scratch = tempfile.TemporaryDirectory()                        # removed when the script ends
    if args.tune_file:
        os.environ["MOEC_TUNE_FILE"] = str(Path(args.tune_file).resolve())
    elif not cuda:
        os.environ["MOEC_TUNE_FILE"] = str(Path(scratch.name) / "tune.json")
    if cuda:
        device, dtype, shape, arch = "cuda", torch.bfloat16 if args.bf16 else torch.float16, (1024, 2048, 8, 2), None
        # a short run: two buckets, three model candidates each (the defaults tune all four)
        options = dict(buckets=(16, 128), candidates=3)
    else:
        device, dtype, shape, arch = "cpu", torch.float32, (32, 64, 8, 2), "sm90"
        os.environ["MOEC_TUNE_DEVICE"] = "CPU stand-in"           # the made-up device the entries are for
        options = dict(timer=wall_clock, device="CPU stand-in", buckets=(16,), candidates=1, sizes={16: (1, 4)})

    torch.manual_seed(0)
    model = moec.compile(SparseMoE(*shape).to(device, dtype).eval(), arch=arch)
    x = torch.randn(4, shape[0], device=device, dtype=dtype)
    with torch.no_grad():
        before = model(x)                                          # compiled with the cost model's tiles

    tuned = moec.tune(model, x, **options)                         # progress: a line per candidate

    with torch.no_grad():
        after = model(x)                                           # recompiled once with the tuned tiles
        with moec.disabled():
            eager = model(x)
    err = ((after.float() - eager.float()).norm() / eager.float().norm()).item()
    print(model.explain())
    print(f"\nrelative error vs eager after tuning: {err:.2e}")
    assert err < (2e-2 if dtype != torch.float32 else 1e-4), err
    assert torch.allclose(before.float(), after.float(), atol=5e-2 if dtype != torch.float32 else 1e-5)
    assert "tuned)" in model.explain(), "the layer did not pick up the tuned tiles"

    path = autotune.tune_file()
    data = json.loads(path.read_text())
    print(f"\n{path} ({data['format']}): {len(tuned)} kernels tuned, e.g.")
    key, buckets = next(iter(tuned.items()))
    print(f"  {key}\n    {json.dumps(buckets)}")


if __name__ == "__main__":
    main()
