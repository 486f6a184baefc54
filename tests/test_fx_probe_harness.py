"""The probe harness (`moec.frontend.probe_harness`) both probes run eager code through: copied,
seeded inputs; flags, buffers and the caller's RNG restored; dtype tolerances; near ties."""
from __future__ import annotations

import copy

import torch
from torch import nn

import moec
from moec.frontend import LiftedMoE, NotLifted, lift, probe
from moec.frontend.moba_lift import LiftedMoba, analyse
from moec.frontend.probe_harness import draw, first, mismatch, near_tie, rtol, run, tie_rtol

import zoo
from moba_zoo import MobaCore


class Doubling(zoo.MixtralMoE):
    """Scales its input in place before routing: eager computes f(2x) and leaves 2x in the caller's x."""

    def forward(self, hidden_states):
        hidden_states.mul_(2)
        return super().forward(hidden_states)


def test_run_gives_eager_code_copies():
    x = draw((3, 4), 0)
    kept = x.clone()
    out = run(lambda t: t.mul_(2), (x,), nn.Linear(1, 1), False, x.device, 0)
    assert torch.equal(x, kept) and torch.equal(out, 2 * kept)


def test_moe_probe_judges_a_mutating_forward_on_the_original_values():
    torch.manual_seed(0)
    plain = zoo.MixtralMoE().eval()
    lifted = lift(plain)
    assert isinstance(lifted, LiftedMoE)
    doubling = Doubling().eval()
    doubling.load_state_dict(plain.state_dict())
    msg = probe(doubling, lifted)               # the forward computed f(2x) and left 2x in its input
    assert msg and "writes into its input in place" in msg, msg
    assert probe(plain, lifted) is None
    got = lift(doubling)
    assert isinstance(got, NotLifted) and "no candidate configuration" in got.reason, got


class CountsInPlace(MobaCore):
    """Updates an argument in place outside the core: the graph replays that write once per call."""

    def forward(self, q, k, v, steps):
        steps.add_(1)
        return super().forward(q, k, v), steps * 1


def test_moba_probe_runs_eager_and_the_replay_on_equal_copies():
    """Eager's write must not reach the replay it is compared with (it once made the probe say "the
    traced graph does not reproduce the eager forward"), nor the caller's tensors."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 40, 16, generator=g) for h in (4, 2, 2))
    steps = torch.zeros(3)
    got = analyse(CountsInPlace(block_size=16, top_k=3), (q, k, v, steps), {})
    assert isinstance(got, LiftedMoba) and got.config.top_k == 3, got
    assert torch.equal(steps, torch.zeros(3))
    m, ref = CountsInPlace(block_size=16, top_k=3), CountsInPlace(block_size=16, top_k=3)
    moec.compile(m)
    mine, theirs = torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for _ in range(2):
            (out, s), (want, t) = m(q, k, v, mine), ref(q, k, v, theirs)
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(s, t)
    assert mine.tolist() == theirs.tolist() == [2.0] * 3
    assert m.__dict__["_moec_region"].calls["kernels"] == 2


def test_run_restores_flags_buffers_and_rng():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).eval()
    state = copy.deepcopy(m.state_dict())
    rng = torch.get_rng_state()
    x = draw((8, 4), 1)
    a = run(m, (x,), m, True, x.device, 7)
    b = run(m, (x,), m, True, x.device, 7)      # same seed, same buffers: the same dropout mask
    assert torch.equal(a, b) and not m.training and not any(c.training for c in m.modules())
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_tolerances_and_reasons():
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert rtol(torch.float32) < rtol(torch.float16) == rtol(torch.bfloat16)
    assert tie_rtol(torch.float32) < tie_rtol(torch.float16) < tie_rtol(torch.bfloat16)
    assert mismatch(ref + 1e-5, ref, torch.float32) is None
    assert "max abs error" in mismatch(ref + 1e-2, ref, torch.float32)
    assert mismatch(ref + 1e-2, ref, torch.float16) is None
    assert "shape" in mismatch(ref[:2], ref, torch.float32)
    assert "non-finite" in mismatch(ref / 0, ref, torch.float32)
    keep = torch.tensor([True, True, False])
    assert mismatch(ref + torch.tensor([0.0, 0.0, 1.0]), ref, torch.float32, keep) is None
    assert first(iter([None, "a", "b"])) == "a" and first([None, None]) is None


def test_near_tie_rows():
    keys = torch.tensor([[3.0, 2.0, 1.999, 0.0],       # 2nd and 3rd within 1e-2 of the spread
                         [3.0, 2.0, 1.0, 0.0],
                         [3.0, float("-inf"), float("-inf"), float("-inf")]])
    spread = keys.masked_fill(~torch.isfinite(keys), 0).abs().amax(-1)
    assert near_tie(keys, 2, torch.float16, spread).tolist() == [True, False, False]
    assert near_tie(keys, 2, torch.float32, spread).tolist() == [False, False, False]


def test_draw_is_reproducible_and_device_independent():
    assert torch.equal(draw((2, 3), 5), draw((2, 3), torch.Generator().manual_seed(5)))
    assert torch.equal(draw((2, 3), 5, torch.float16), draw((2, 3), 5).half())
