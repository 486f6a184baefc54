"""MoBA installed into transformers the way MoBA's own package does (a function registered in
``ALL_ATTENTION_FUNCTIONS``, `moba_hf_plugin`), then ``moec.compile(model)``: the attention modules' calls
of that function are lifted (the prefill's per-sequence cores run the kernels, decode steps run as
written), other callers keep the original. Compared with an eager copy made before compiling."""
import copy
import functools
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import hf_models  # noqa: E402
import moec  # noqa: E402
from moec.hf import attention_functions  # noqa: E402
from moba_hf_plugin import NAME, moba_layer, register_moba  # noqa: E402
from moba_zoo import moba_varlen_naive  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
IDS = torch.randint(3, hf_models.VOCAB, (2, 29), generator=torch.Generator().manual_seed(3))


def pair(chunk_size=8, topk=3, family="mixtral"):
    register_moba(chunk_size, topk)
    cfg = hf_models.CONFIGS[family]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[0].normal_()
    return model, copy.deepcopy(model)


def regions(model):
    return [attention_functions.region_of(m) for m in model.modules() if attention_functions.region_of(m)]


def test_registered_moba_function_is_lifted_and_matches_eager():
    model, ref = pair()
    moec.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    text = model.explain()
    assert f"self_attn (MixtralAttention -> attention function '{NAME}')" in text, text
    assert "block_size=8, top_k=3" in text, text
    rs = regions(model)
    assert rs and all(r.state == "lifted" and r.calls["kernels"] == 2 for r in rs), text
    assert not regions(ref)                        # the eager copy calls the original function


def test_generate_runs_the_prefill_on_kernels_and_decode_steps_as_written():
    model, ref = pair()
    moec.compile(model)
    with torch.no_grad():
        got = model.generate(IDS, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        want = ref.generate(IDS, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    r = regions(model)[0]
    assert r.calls["kernels"] == 2 and sum(n for k, n in r.calls.items() if k.startswith("eager")) == 3, r.calls


def test_training_gradients_match_eager():
    model, ref = pair(chunk_size=4, topk=2)
    model.train(), ref.train()
    moec.compile(model)
    for m in (model, ref):
        m(IDS, labels=IDS).loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None or grads[name].grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)
    assert any(r.calls["kernels forward and backward"] for r in regions(model))


def test_other_functions_and_later_registrations_run_as_registered():
    """A registered function that is not MoBA is left alone; one registered again after compiling replaces
    the dispatch, and the model calls it as written."""
    ALL_ATTENTION_FUNCTIONS["plain_sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
    cfg = hf_models.CONFIGS["mixtral"]()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="plain_sdpa").eval()
    moec.compile(model)
    assert not regions(model) and not isinstance(ALL_ATTENTION_FUNCTIONS["plain_sdpa"], attention_functions.Dispatch)

    model, ref = pair()
    moec.compile(model)
    calls = []
    again = functools.partial(moba_layer, moba_varlen_naive, 8, 3)

    def counted(*args, **kwargs):
        calls.append(1)
        return again(*args, **kwargs)
    ALL_ATTENTION_FUNCTIONS[NAME] = counted
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    assert calls and all(r.calls["kernels"] == 0 for r in regions(model))


def test_pickled_compiled_model_is_lifted_again():
    model, ref = pair()
    moec.compile(model)
    loaded = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    assert regions(loaded) and all(r.calls["kernels"] == 2 for r in regions(loaded))


def test_registering_the_name_again_reaches_every_model():
    """A function registered with ``AttentionInterface.register`` is dispatched where it was registered, so
    registering the name again (the same way) replaces it for compiled and uncompiled models alike."""
    from transformers import AttentionInterface
    name = "moba_plugin_global"
    first = functools.partial(moba_layer, moba_varlen_naive, 8, 3)
    second = functools.partial(moba_layer, moba_varlen_naive, 4, 2)
    AttentionInterface.register(name, first)
    cfg = hf_models.CONFIGS["mixtral"]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name).eval()
    other = copy.deepcopy(model)
    moec.compile(model)
    assert isinstance(ALL_ATTENTION_FUNCTIONS[name], attention_functions.Dispatch)
    AttentionInterface.register(name, second)
    want = copy.deepcopy(other)
    with torch.no_grad():
        w = want(IDS).logits                         # an eager model under the new registration
        torch.testing.assert_close(other(IDS).logits, w)
        torch.testing.assert_close(model(IDS).logits, w, rtol=1e-4, atol=1e-4)
    assert ALL_ATTENTION_FUNCTIONS[name] is second
