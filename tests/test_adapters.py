"""Module adapters (`moec.frontend.adapters`): a registered reading is still confirmed by the probe,
a reading that does not reproduce the forward is refused, an adapter can decline (None) or report
a reason (NotLifted); a hooked router still sees its calls in a compiled layer. No transformers."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

import moec
from moec.frontend import LiftedMoE, NotLifted, adapter_for, find_moe_modules, lift, register_adapter
from moec.frontend.adapters import activation_of
from moec.frontend.lifted import ParamTensors, Src, WeightsRecipe
from moec.spec import MoESpec, RouterConfig

E, D, F_ = 4, 16, 8


class FlatExpertsMoE(nn.Module):
    """Experts kept as 2-D [E*f, d] matrices (DBRX-like): the generic reader finds no experts here."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E * F_, D) * 0.3)
        self.v1 = nn.Parameter(torch.randn(E * F_, D) * 0.3)
        self.w2 = nn.Parameter(torch.randn(E * F_, D) * 0.3)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, D)
        probs = torch.softmax(self.router(x), dim=-1)
        w, ids = probs.topk(2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            rows = slice(e * F_, (e + 1) * F_)
            h = F.silu(x[tok] @ self.w1[rows].T) * (x[tok] @ self.v1[rows].T)
            y.index_add_(0, tok, (h @ self.w2[rows]) * w[tok, slot, None])
        return y.reshape(shape)


def _reading(renormalize: bool):
    fields = (("w_router", Src((0,))), ("w_gate", Src((1,), view=(E, F_, D))), ("w_up", Src((2,), view=(E, F_, D))),
              ("w_down", Src((3,), view=(E, F_, D), transpose=True)))
    return LiftedMoE(spec=MoESpec(hidden=D, ffn=F_, router=RouterConfig(num_experts=E, top_k=2, renormalize=renormalize)),
                     formulation="test adapter", param_tensors=ParamTensors(("router.weight", "w1", "v1", "w2")),
                     weights=WeightsRecipe(fields), outputs="y", observed=("router",))


def test_generic_reader_does_not_find_flat_experts():
    assert lift(FlatExpertsMoE()) is None


def test_adapter_reading_is_probed_and_compiled():
    class GoodFlatMoE(FlatExpertsMoE):
        pass

    register_adapter("GoodFlatMoE", __name__)(lambda m: _reading(renormalize=True))
    torch.manual_seed(0)
    eager = GoodFlatMoE().eval()
    assert adapter_for(eager) is not None
    model = moec.compile(copy.deepcopy(eager))
    report = model.explain()
    assert "LIFTED  <root> (GoodFlatMoE): test adapter" in report, report
    assert "probe: eager forward matched" in report
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-5)
    assert model.__dict__["_moec_region"].calls["kernels"] == 1

    # a hook on the router (how transformers records router logits) still sees the router's output
    seen = []
    model.router.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        model(x)
    assert len(seen) == 1 and seen[0].shape == (10, E)
    torch.testing.assert_close(seen[0], eager.router(x.reshape(-1, D)))


def test_wrong_adapter_reading_is_refused_by_the_probe():
    class BadFlatMoE(FlatExpertsMoE):
        pass

    register_adapter("BadFlatMoE", __name__)(lambda m: _reading(renormalize=False))   # eager renormalises
    got = lift(BadFlatMoE())
    assert isinstance(got, NotLifted) and "adapter's reading does not reproduce" in got.reason, got


def test_adapter_may_decline_or_give_a_reason():
    class Declined(FlatExpertsMoE):
        pass

    class Refused(FlatExpertsMoE):
        pass

    register_adapter("Declined", __name__)(lambda m: None)
    register_adapter("Refused", __name__)(lambda m: NotLifted("Refused: not computable"))
    register_adapter("Refused", "some.other.library")(lambda m: _reading(True))        # another module: no match
    assert lift(Declined()) is None                      # the generic reader ran (and found nothing)
    assert lift(Refused()).reason == "Refused: not computable"
    assert [q for q, _ in find_moe_modules(nn.Sequential(Refused()))] == ["0"]


def test_activation_is_read_by_evaluating_it():
    assert activation_of(nn.SiLU()) == "silu"
    assert activation_of(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_of(F.gelu) == "gelu"
    assert activation_of(torch.tanh) is None


def test_convolution_kernels_are_not_stacked_experts():
    class Mixer(nn.Module):                    # a Mamba-like mixer: conv1d [C, 1, k] and a Linear(r, C)
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(16, 16, 4, groups=16)
            self.dt_proj = nn.Linear(4, 16)

        def forward(self, x):
            return x

    assert find_moe_modules(Mixer()) == []
