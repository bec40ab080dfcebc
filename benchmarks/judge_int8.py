"""The judge's linear layers in bf16 against int8, on this CPU.

    python benchmarks/judge_int8.py [--tokens 512] [--threads 1] [--repeats 5] \
        [--llm-cache <run>/llm_cache] [--out FILE]

The offline judge (Qwen2.5-Coder-1.5B) spends its time in the matrix products of its
linear layers (``benchmarks/README.md``, "The judge's one-token answers"), so its speed
follows the CPU's bf16 GEMM rate: about three times higher with AMX than with AVX-512
BF16 alone.  This measures, at the judge's layer shapes (hidden 1536, MLP 8960, KV 256)
and a prompt-sized batch of tokens, the seconds per layer and GFLOP/s of: ``F.linear`` in
bf16 (what the judge runs), in float32, ``torch.ao.quantization.quantize_dynamic``'s int8
``Linear`` (``int8_dynamic``: int8 weights per tensor, activations quantised per call with one
scale, float32 in and out), and ``int8_per_token``: the library's ``Int8Linear``
(``autointerp.local_int8``; int8 weights per output channel and activations per token,
multiplied by ``torch._int_mm``: VNNI / AMX-INT8 kernels), bf16 in and out, with the
activations' quantisation and the int32 result's scaling back to bf16 counted.  It reports each one's relative error against
float32 on the same input.  With ``--llm-cache`` (a finished run's request cache) the inputs
and weights are the judge's own: the inputs each kind of layer receives in the middle layer
of the judge on real prompts of the run (``--tokens`` tokens), where a few channels carry
activations far larger than the rest; without it, random Gaussian inputs and weights.
Nothing here changes the judge; a switch to int8 would need the validation set measured
again.  Prints one JSON object (load average included) and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402

SHAPES = {"q_proj / o_proj": (1536, 1536), "k_proj / v_proj": (1536, 256), "gate / up_proj": (1536, 8960),
          "down_proj": (8960, 1536)}
"""(in, out) features of the judge's linear layers (Qwen2.5-1.5B: hidden 1536, MLP 8960, 2 KV heads of 128)."""
PER_LAYER = {"q_proj / o_proj": 2, "k_proj / v_proj": 2, "gate / up_proj": 2, "down_proj": 1}
"""How many of each shape one decoder layer holds."""


def cpu_info() -> dict:
    """The CPU's model name and which of the matrix instruction sets that matter here it has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return {"model": model, **{f: f in flags for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni")}}


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (kernel selection, packing)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def real_inputs(llm_cache: Path, tokens: int) -> dict:
    """Per kind of linear layer, (its input, its weight, its bias) in the middle layer of the
    judge, on ``tokens`` tokens of the longest prompts in ``llm_cache`` (the explainer's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metasae.autointerp.judges import ensure_judge

    prompts = []
    for f in sorted(llm_cache.glob("*/*.json")):
        d = json.loads(f.read_text())
        prompts.append(d["messages"])
    if not prompts:
        raise SystemExit(f"{llm_cache} holds no cached request: pass a finished run's <out>/llm_cache")
    folder = ensure_judge("qwen2.5-coder-1.5b")
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=torch.bfloat16).eval()
    texts = sorted((tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts),
                   key=len, reverse=True)
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            break
    layer = model.model.layers[len(model.model.layers) // 2]
    # one layer per shape, with its own input (q_proj stands for o_proj: both 1536 x 1536)
    mods = {"q_proj / o_proj": layer.self_attn.q_proj, "k_proj / v_proj": layer.self_attn.k_proj,
            "gate / up_proj": layer.mlp.gate_proj, "down_proj": layer.mlp.down_proj}
    seen: dict = {}

    def keep(name):
        def hook(mod, args):
            seen[name] = args[0][0].float().clone()  # returns None: the input goes on unchanged
        return hook
    hooks = [m.register_forward_pre_hook(keep(name)) for name, m in mods.items()]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:tokens]]))
    for h in hooks:
        h.remove()
    out = {name: (seen[name], m.weight.detach().float(), None if m.bias is None else m.bias.detach().float())
           for name, m in mods.items()}
    return {"layers": out, "prompt_tokens": min(tokens, len(ids)),
            "input_abs_max_over_median": {k: float(v[0].abs().max() / v[0].abs().median()) for k, v in out.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens per call (a prompt's prefill)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--llm-cache", default="", help="a finished run's request cache: the judge's own inputs")
    p.add_argument("--out", default="")
    a = p.parse_args()

    import torch

    from metasae.autointerp.int8 import Int8Linear

    t0 = time.time()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    res: dict = {"tokens": a.tokens, "threads": a.threads, "torch": torch.__version__, "layers": {}}
    res["cpu"] = cpu_info()
    real = real_inputs(Path(a.llm_cache), a.tokens) if a.llm_cache else None
    res["inputs"] = "the judge's own (middle layer, real prompts)" if real else "random Gaussian"
    if real:
        res["prompt_tokens"] = real["prompt_tokens"]
        res["input_abs_max_over_median"] = real["input_abs_max_over_median"]
    kinds = ("bf16", "float32", "int8_dynamic", "int8_per_token")
    tot = dict.fromkeys(kinds, 0.0)
    layer = dict.fromkeys(kinds, 0.0)
    flops_all = 0.0
    for name, (fin, fout) in SHAPES.items():
        lin = torch.nn.Linear(fin, fout, bias=name != "down_proj")
        if real:
            x, w, b = real["layers"][name]
            with torch.no_grad():
                lin.weight.copy_(w)
                if lin.bias is not None:
                    lin.bias.copy_(b if b is not None else torch.zeros(fout))
        else:
            x = torch.randn(a.tokens, fin, generator=g)
            with torch.no_grad():
                lin.weight.normal_(0, fin ** -0.5, generator=g)
        n_tok = x.shape[0]
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        xb, wb = x.bfloat16(), lin.weight.detach().bfloat16()
        bb = None if lin.bias is None else lin.bias.detach().bfloat16()
        pt = Int8Linear(lin)
        flops = 2.0 * n_tok * fin * fout
        flops_all += flops
        with torch.no_grad():
            s = {"bf16": best_seconds(lambda: torch.nn.functional.linear(xb, wb, bb), a.repeats),
                 "float32": best_seconds(lambda: lin(x), a.repeats),
                 "int8_dynamic": best_seconds(lambda: q(x), a.repeats),
                 "int8_per_token": best_seconds(lambda: pt(xb), a.repeats)}
            ref = lin(x)

            def err(y):
                return float((y.float() - ref).norm() / ref.norm())
            errors = {"int8_dynamic": err(q(x)), "int8_per_token": err(pt(xb)),
                      "bf16": err(torch.nn.functional.linear(xb, wb, bb))}
        for k in tot:
            tot[k] += s[k]
            layer[k] += PER_LAYER[name] * s[k]
        res["layers"][name] = {"in": fin, "out": fout, "tokens": n_tok, "seconds": s,
                               "gflop_per_s": {k: flops / v / 1e9 for k, v in s.items()},
                               "rel_error_vs_float32": errors}
    res["one_of_each_layer"] = {"seconds": tot, "gflop_per_s": {k: flops_all / v / 1e9 for k, v in tot.items()},
                                "int8_speedup_vs_bf16": tot["bf16"] / tot["int8_dynamic"],
                                "int8_per_token_speedup_vs_bf16": tot["bf16"] / tot["int8_per_token"]}
    # a whole decoder layer's linear layers (7: q, k, v, o, gate, up, down)
    res["decoder_layer"] = {"seconds": layer, "int8_speedup_vs_bf16": layer["bf16"] / layer["int8_dynamic"],
                            "int8_per_token_speedup_vs_bf16": layer["bf16"] / layer["int8_per_token"]}
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
