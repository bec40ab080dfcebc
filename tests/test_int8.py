"""Int8 linear layers for a local judge (``autointerp.local_int8``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metasae.autointerp.int8 import Int8Linear, quantize_linears


def test_int8_linear_is_exact_on_representable_values():
    """Integer weights and inputs whose per-row maxima are 127 quantise to themselves: the int32
    product is exact, so the layer equals the float product up to the final rounding."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (24, 40), generator=g).float()
    w[:, 0] = 127.0  # each output channel's scale is exactly 1
    x = torch.randint(-127, 128, (7, 40), generator=g).float()
    x[:, 1] = -127.0  # each token's scale is exactly 1
    lin = torch.nn.Linear(40, 24, bias=True)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.arange(24.0))
    out = Int8Linear(lin)(x)
    assert out.dtype == torch.float32 and torch.equal(out, x @ w.t() + torch.arange(24.0))


def test_int8_linear_scales_each_token_alone():
    """One scale per token: a token with a huge channel does not cost the others any precision
    (each row's output is the same whatever rows it is batched with), and the error against the
    float layer is about 1% where one scale for the whole call would lose most of it."""
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(256, 64, bias=False)
    x = torch.randn(32, 256, generator=g)
    x[3, 5] = 3000.0  # a massive activation, in one token
    q = Int8Linear(lin)
    x0 = x.clone()
    full = q(x)
    assert torch.equal(x, x0)  # the input is left as it was
    for i in (0, 3, 31):
        assert torch.equal(full[i], q(x[i:i + 1])[0])
    ref = lin(x).detach()
    rest = [i for i in range(32) if i != 3]
    err = ((full[rest] - ref[rest]).norm() / ref[rest].norm()).item()
    assert err < 0.02
    # what one scale for the whole call would do to the other tokens: most of their signal gone
    s = x.abs().max() / 127
    per_call = (torch.round(x / s) * s) @ lin.weight.detach().t()
    assert ((per_call[rest] - ref[rest]).norm() / ref[rest].norm()).item() > 0.3
    # shapes and dtype as nn.Linear's: any leading dimensions, the input's dtype
    xb = torch.randn(2, 5, 256, generator=g).bfloat16()
    assert q(xb).shape == (2, 5, 64) and q(xb).dtype == torch.bfloat16


def test_int8_linear_buffers_kept_between_calls_change_nothing():
    """The scratch buffers reused from call to call (grown, then narrowed): every call equals the
    plain formula, whatever came before, and the output never shares their memory."""
    from metasae.autointerp import int8

    def plain(q, x):
        x2 = x.reshape(-1, x.shape[-1]).float()
        s = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)
        xq = torch.div(x2, s).round_().to(torch.int8)
        y = torch._int_mm(xq, q.weight_t).to(x.dtype).mul_(s.to(x.dtype)).mul_(q.weight_scale.to(x.dtype))
        y = y if q.bias is None else y.add_(q.bias.to(y.dtype))
        return y.reshape(*x.shape[:-1], q.out_features)

    g = torch.Generator().manual_seed(2)
    layers = {(48, 40): Int8Linear(torch.nn.Linear(48, 40)), (40, 100): Int8Linear(torch.nn.Linear(40, 100, bias=False))}
    outs = []
    for (k, n), m, dtype in [((48, 40), 50, torch.bfloat16), ((40, 100), 3, torch.bfloat16), ((48, 40), 7, torch.float32),
                             ((40, 100), 80, torch.bfloat16), ((48, 40), 1, torch.bfloat16)]:
        x = (torch.randn(m, k, generator=g) * 4).to(dtype)
        x[:, 2] *= 50
        y = layers[(k, n)](x)
        assert torch.equal(y, plain(layers[(k, n)], x))
        assert all(y.data_ptr() != b.data_ptr() for b in int8._WORKSPACE.values())
        outs.append((y, y.clone()))
    assert all(torch.equal(a, b) for a, b in outs)  # later calls did not write over earlier outputs


def test_quantize_linears_keeps_the_output_layer():
    from metasae.activations.models import load_model

    model = load_model("tiny-llama").model
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    replaced = quantize_linears(model)
    assert replaced == n_linear - 1  # every linear layer but lm_head
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, Int8Linear)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == replaced
    meta = torch.nn.Sequential(torch.nn.Linear(4, 4, device="meta"))
    with pytest.raises(ValueError, match="the int8 layers run on a CPU"):
        quantize_linears(meta)


def test_int8_judge_answers_close_to_float_and_is_named_apart():
    """The hf-local client with ``int8``: the shared-prefix path and generation work, its one-token
    log-probabilities stay close to the float model's, and it is named ``+int8`` (records and the
    request cache never mix its answers with the float model's)."""
    from metasae.activations.models import load_model
    from metasae.autointerp.llm import HFLocalClient
    from metasae.autointerp.scorers import binary_log_odds, detection_messages

    ref_model, q_model = load_model("tiny-llama"), load_model("tiny-llama")
    ref = HFLocalClient(ref_model.model, ref_model.tokenizer, dtype="float32", model_id="tiny")
    q = HFLocalClient(q_model.model, q_model.tokenizer, dtype="float32", model_id="tiny", int8=True)
    assert ref.model_id == "tiny" and q.model_id == "tiny+int8"
    from metasae.autointerp.llm import CachedClient

    msgs = [{"role": "user", "content": "Say 1."}]
    assert CachedClient(q, "unused").key(msgs, 1, 0.0, True) != CachedClient(ref, "unused").key(msgs, 1, 0.0, True)
    texts = ["the men were 600 in number", "And he said to them, go", "a", "This function returns a list"]
    batch = [detection_messages("Numbers and digits written as numerals", t) for t in texts]
    for x, y in zip(q.generate_batch(batch, 1, 0.0, True), ref.generate_batch(batch, 1, 0.0, True)):
        common = set(x.first_token_logprobs) & set(y.first_token_logprobs)
        assert len(common) >= 10
        assert max(abs(x.first_token_logprobs[k] - y.first_token_logprobs[k]) for k in common) < 0.05
        assert binary_log_odds(x) == pytest.approx(binary_log_odds(y), abs=0.05)
    out = q.generate_batch(batch[:2], 4)  # generation (decode steps of one token each) runs too
    assert len(out) == 2 and all(isinstance(c.text, str) for c in out)


def test_hf_local_int8_keep_leaves_named_layers_alone():
    """``int8_keep``: the named layers stay float (their weights untouched), every other linear layer
    but the output layer is int8, and the model's name says which were kept."""
    import torch

    from metasae.activations.models import load_model
    from metasae.autointerp.int8 import Int8Linear
    from metasae.autointerp.llm import HFLocalClient

    m = load_model("tiny-llama")
    down = {n: p.detach().clone() for n, p in m.model.named_parameters() if "down_proj" in n}
    q = HFLocalClient(m.model, m.tokenizer, dtype="float32", model_id="tiny", int8=True, int8_keep=("down_proj",))
    assert q.model_id == "tiny+int8-keep-down_proj"
    kinds = {n: type(mod) for n, mod in q.model.named_modules() if isinstance(mod, (torch.nn.Linear, Int8Linear))}
    assert all(k is torch.nn.Linear for n, k in kinds.items() if n.endswith(("down_proj", "lm_head")))
    assert all(k is Int8Linear for n, k in kinds.items() if not n.endswith(("down_proj", "lm_head")))
    assert sum(n.endswith("down_proj") for n in kinds) >= 1 and sum(k is Int8Linear for k in kinds.values()) >= 6
    after = dict(q.model.named_parameters())
    assert all(torch.equal(after[n], w) for n, w in down.items())
    other = load_model("tiny-llama")
    with pytest.raises(ValueError, match="int8_keep: no linear layer of tiny has a name ending in 'downproj'"):
        HFLocalClient(other.model, other.tokenizer, dtype="float32", model_id="tiny", int8=True, int8_keep=("downproj",))


def test_local_int8_config_and_names():
    from metasae.autointerp.llm import model_label
    from metasae.config import AutointerpConfig, ConfigError

    cfg = AutointerpConfig(model="qwen2.5-coder-1.5b", local_int8=True)
    cfg.validate()
    assert model_label(cfg) == "qwen2.5-coder-1.5b+int8" and model_label(cfg, "judge") == "qwen2.5-coder-1.5b+int8"
    assert model_label(dataclasses.replace(cfg, local_int8=False)) == "qwen2.5-coder-1.5b"
    with pytest.raises(ConfigError, match="local_int8 applies to the 'hf-local' backend only"):
        AutointerpConfig(backend="openai", base_url="http://127.0.0.1:8000/v1", local_int8=True).validate()
    kept = dataclasses.replace(cfg, int8_keep=["down_proj"])
    kept.validate()
    assert model_label(kept) == model_label(kept, "judge") == "qwen2.5-coder-1.5b+int8-keep-down_proj"
    with pytest.raises(ConfigError, match="int8_keep names layers kept out of int8, and applies only with"):
        dataclasses.replace(kept, local_int8=False).validate()
    for bad in ([""], ["down_proj,up_proj"], [3]):
        with pytest.raises(ConfigError, match="int8_keep must list module names"):
            dataclasses.replace(kept, int8_keep=bad).validate()
