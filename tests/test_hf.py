"""Hugging Face transformers MoE models run through moec unmodified (tiny random configs, fp32, the
Triton interpreter): ``moec.compile(model)`` lifts every MoE block it supports (PhiMoE stays
eager, with the reason), logits and greedy generation match eager, router-logit outputs
still work, and ``experts_implementation="moec"`` matches ``"eager"``."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import moec  # noqa: E402
import moec.hf  # noqa: E402

import hf_models as H  # noqa: E402

FAMILIES = list(H.BLOCKS)
LIFTED = [n for n in FAMILIES if H.BLOCKS[n][1] == "lifted"]


def _close(a, b, tol=2e-4):
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    assert err <= tol * max(scale, 1.0), f"max abs error {err:.3g} (scale {scale:.3g})"


def _regions(model):
    return [m.__dict__["_moec_region"] for m in model.modules() if "_moec_region" in m.__dict__]


def _names(line: str, q: str, cls: str) -> bool:
    """Whether an explain() entry's head names module ``q``: itself, or a range ``layers.0-1.mlp`` of it."""
    m = re.match(r"\s*(LIFTED|EAGER)\s+(\S+) \(" + re.escape(cls) + r"\)", line)
    if not m:
        return False
    pattern = re.sub(r"(\d+)-(\d+)", lambda r: f"(?P<n{r.start()}>\\d+)", re.escape(m.group(2)).replace(r"\-", "-"))
    hit = re.fullmatch(pattern, q)
    if hit is None:
        return False
    ranges = [tuple(map(int, r)) for r in re.findall(r"(\d+)-(\d+)", m.group(2))]
    return all(lo <= int(v) <= hi for (lo, hi), v in zip(ranges, hit.groups()))


@pytest.mark.parametrize("name", FAMILIES)
def test_family_compiles_and_matches_eager(name):
    eager, model = H.pair(name)
    cls, how, words = H.BLOCKS[name]
    blocks = H.blocks(model, name)
    assert blocks, f"the tiny {name} model has no {cls}"
    report = model.explain()
    for q in blocks:
        line = next((ln for ln in report.splitlines() if _names(ln, q, cls)), None)
        assert line is not None, f"{q} missing from explain():\n{report}"
        if how == "lifted":
            assert line.lstrip().startswith("LIFTED"), report
        else:
            assert line.lstrip().startswith("EAGER") and all(w in line for w in words), report
    ids = torch.randint(3, H.VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0                                      # left padding in the second row
    with torch.no_grad():
        _close(model(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits)
    regions = _regions(model)
    if how == "lifted":
        assert len(regions) == len(blocks)
    else:               # an eager block's experts module may still run the kernels (moec.hf.block_experts)
        from moec.hf.block_experts import BlockExperts
        assert all(isinstance(r, BlockExperts) and r.block in blocks for r in regions), regions
    assert all(r.calls["kernels"] >= 1 for r in regions), [r.calls for r in regions]


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(name=st.sampled_from(FAMILIES), batch=st.integers(1, 2), seq=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_logits_match_eager_on_random_ids(name, batch, seq, seed):
    eager, model = H.pair(name)
    ids = torch.randint(0, H.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _close(model(ids).logits, eager(ids).logits)


@pytest.mark.parametrize("name", LIFTED)
def test_greedy_generate_matches_eager(name):
    eager, model = H.pair(name)
    import inspect            # generate() inspects forward's parameters: the compiled class keeps them
    assert inspect.signature(model.forward) == inspect.signature(eager.forward)
    prompt = torch.randint(3, H.VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert model.generate(prompt, **kw).tolist() == eager.generate(prompt, **kw).tolist()


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_router_logits_and_aux_loss_still_recorded(name):
    """transformers records router logits with forward hooks on the router module, which a
    compiled block does not otherwise call: the region calls the hooked router for them."""
    eager, model = H.pair(name)
    ids = torch.randint(3, H.VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = model(ids, output_router_logits=True)
        b = eager(ids, output_router_logits=True)
    assert len(a.router_logits) == len(b.router_logits) == len(H.blocks(eager, name))
    for u, v in zip(a.router_logits, b.router_logits):
        _close(u, v)
    if b.aux_loss is not None:
        _close(a.aux_loss, b.aux_loss)
    _close(a.logits, b.logits)


@pytest.mark.parametrize("name", ["qwen2_moe", "gpt_oss"])
def test_training_step_gradients_match_eager(name):
    eager, _ = H.pair(name)
    import copy
    e = copy.deepcopy(eager).train()
    m = moec.compile(copy.deepcopy(eager)).train()
    ids = torch.randint(3, H.VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    la = m(ids, labels=ids, output_router_logits=True).loss       # + aux loss from the recorded router logits
    lb = e(ids, labels=ids, output_router_logits=True).loss
    la.backward()
    lb.backward()
    _close(la.detach(), lb.detach())
    grads = dict(m.named_parameters())
    for n, p in e.named_parameters():
        if p.grad is not None:
            _close(grads[n].grad, p.grad, tol=1e-3)
    assert all(r.calls["kernels forward and backward"] >= 1 for r in _regions(m))


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_experts_implementation_moec_matches_eager(name):
    assert moec.hf.register()
    eager = H.build(name, experts_implementation="eager")
    model = H.build(name, experts_implementation="moec")
    assert model.config._experts_implementation == "moec"
    ids = torch.randint(3, H.VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _close(model(ids).logits, eager(ids).logits)
    calls = moec.hf.calls(model)
    assert set(calls) == {"kernels"}, calls        # GPT-OSS too: biases, interleaved clamped SwiGLU
    if name == "mixtral":
        kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert model.generate(ids[:1], **kw).tolist() == eager.generate(ids[:1], **kw).tolist()


@pytest.mark.parametrize("activations", ["auto", "save", "recompute"])
def test_experts_implementation_moec_gradients(activations, monkeypatch):
    """The experts' backward on generated kernels, its gate/up products saved by the forward or recomputed
    (``MOEC_ACTIVATIONS``: transformers' experts interface has no compile call to take it)."""
    monkeypatch.setenv("MOEC_ACTIVATIONS", activations)
    assert moec.hf.register()
    eager = H.build("mixtral", experts_implementation="eager").train()
    model = H.build("mixtral", experts_implementation="moec").train()
    ids = torch.randint(3, H.VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    eager(ids, labels=ids).loss.backward()
    grads = dict(model.named_parameters())
    for n, p in eager.named_parameters():
        if p.grad is not None:
            _close(grads[n].grad, p.grad, tol=1e-3)
    assert moec.hf.calls(model)["kernels forward and backward"] == 2
    assert moec.hf.calls(model)["backward: kernels"] == 2          # the experts' backward: generated kernels
    regions = [m.__dict__["_moec_experts_region"] for m in model.modules() if "_moec_experts_region" in m.__dict__]
    saved = {r.pre for region in regions for r, _, _ in region.compiled if hasattr(r, "pre")}
    assert saved == ({("pre_gate", "pre_up")} if activations == "save" else {()}), saved


def test_experts_backward_dumps_its_program(tmp_path, monkeypatch):
    """With a dump directory the experts' backward program is dumped too, beside the forward's."""
    monkeypatch.setenv("MOEC_DUMP_DIR", str(tmp_path))
    model = H.build("mixtral", experts_implementation="moec").train()
    ids = torch.randint(3, H.VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    model(ids, labels=ids).loss.backward()
    dumped = {p.name for p in tmp_path.rglob("*") if p.is_dir()}
    assert any(n.startswith("hf_experts") and n.endswith(".backward") for n in dumped), dumped
    assert any(p.name.startswith("d_w_down.grouped_wgrad") for p in tmp_path.rglob("*.py"))


def test_experts_layouts_read_by_moec():
    """Transposed weights and ungated experts, on an experts module of the transformers interface."""
    from torch import nn
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    class Cfg:
        _experts_implementation = "moec"

    def make(**flags):
        @use_experts_implementation(**flags)
        class Experts(nn.Module):
            def __init__(self, config, E=4, d=32, f=16):
                super().__init__()
                self.num_experts = E
                gated, tr = flags.get("has_gate", True), flags.get("is_transposed", False)
                w1 = torch.randn(E, (2 if gated else 1) * f, d) * 0.2
                w2 = torch.randn(E, d, f) * 0.2
                setattr(self, "gate_up_proj" if gated else "up_proj", nn.Parameter(w1.mT.contiguous() if tr else w1))
                self.down_proj = nn.Parameter(w2.mT.contiguous() if tr else w2)
                self.act_fn = ACT2FN["gelu_pytorch_tanh" if gated else "relu"]
                self._w = (w1, w2)

            def forward(self, x, ids, wts):
                w1, w2 = self._w
                y = torch.zeros_like(x)
                for t in range(x.shape[0]):
                    for s in range(ids.shape[1]):
                        h = w1[ids[t, s]] @ x[t]
                        h = self.act_fn(h.chunk(2)[0]) * h.chunk(2)[1] if self.has_gate else self.act_fn(h)
                        y[t] += wts[t, s] * (w2[ids[t, s]] @ h)
                return y
        return Experts

    moec.hf.register()
    torch.manual_seed(0)
    x, ids, wts = torch.randn(7, 32), torch.randint(0, 4, (7, 2)), torch.rand(7, 2)
    for flags in ({}, {"is_transposed": True}, {"has_gate": False}, {"has_gate": False, "is_transposed": True}):
        ex = make(**flags)(Cfg())
        with torch.no_grad():
            y = ex(x, ids, wts)
            Cfg._experts_implementation = "eager"
            y_eager = ex(x, ids, wts)
            Cfg._experts_implementation = "moec"
        _close(y, y_eager)
        assert set(ex.__dict__["_moec_experts_region"].calls) == {"kernels"}, (flags, ex.__dict__["_moec_experts_region"].calls)


def test_moec_imports_and_compiles_without_transformers(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None\n"
        "import torch, moec, moec.hf\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import zoo\n"
        "m = moec.compile(zoo.MixtralMoE())\n"
        "assert 'LIFTED' in m.explain()\n"
        "assert moec.hf.register() is False\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_layer_benchmark_runs_small(tmp_path):
    """benchmarks/hf_layer.py (real-size layers on a GPU) runs at tiny sizes on the CPU and every method's
    output matches eager's (its exit code says so)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import hf_layer
    finally:
        sys.path.pop(0)
    out = tmp_path / "hf_layer.json"
    assert hf_layer.main(["--small", "--models", "qwen3", "--tokens", "3", "--out", str(out)]) == 0
    import json
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == set(hf_layer.METHODS) and all("error" not in r for r in rows)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_optimizer_steps_of_a_compiled_model_match_eager(name):
    """A few AdamW steps of a compiled tiny transformers model, its MoE blocks' backward on moec's generated
    kernels, give eager's losses (with the load-balancing loss from the recorded router logits)."""
    import copy
    eager = H.build(name).train()
    model = moec.compile(copy.deepcopy(eager)).train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, eager)]
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        ids = torch.randint(3, H.VOCAB, (2, 6), generator=gen)
        losses = []
        for m, opt in zip((model, eager), opts):
            opt.zero_grad()
            loss = m(ids, labels=ids, output_router_logits=True).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        _close(losses[0], losses[1], tol=1e-4)
    assert all(r.calls["backward: kernels"] == 3 for r in _regions(model)), [r.calls for r in _regions(model)]
