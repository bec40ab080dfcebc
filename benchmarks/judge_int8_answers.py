"""How far the int8 judge's answers move from bf16's, per way of placing int8 in the judge.

    python benchmarks/judge_int8_answers.py --llm-cache <run>/llm_cache [--n 40] [--threads 1] \
        [--variants full,keep:down_proj,keep-layers:1,2,3,4,5,26,smooth:0.5,smooth:0.8] [--out FILE]

Draws ``--n`` simulation prompts and ``--n`` fuzz/detection prompts from a finished run's request
cache (the judge's real one-token questions), answers them with the profile's hf-local judge in
bf16 and then in each variant, and prints per variant the mean and largest absolute change of the
simulation's expected digit (0-9) and of the binary scorers' log-odds P("1") / P("0"), the answers
whose sign flips, and the seconds.  Variants (``autointerp.local_int8`` is ``full``):

* ``full``: every linear layer but the output layer in int8 (``Int8Linear``);
* ``keep:NAMES``: those layers (ends of module names, ``+``-separated) left in bf16
  (``autointerp.int8_keep``);
* ``keep-layers:I,J,...``: ``down_proj`` left in bf16 in those decoder layers only (the ones whose
  input carries the largest outliers: ``--outliers`` lists them);
* ``smooth:ALPHA``: SmoothQuant (Xiao et al. 2023) on every MLP before quantising: input channel j
  of ``down_proj`` divided by s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (max|x_j| over the
  drawn prompts), its weight column multiplied by s_j and ``up_proj``'s row j divided by it, which
  leaves the float model unchanged.  Not in the library: measured here, it did not pay.

``--outliers`` also prints, per decoder layer, the largest ratio of a token's max |x| to its median
|x| at ``down_proj``'s input.  One thread by default, as ``bash run_all.sh`` runs the judge.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402

def draw_prompts(cache: Path, n: int, seed: int = 0) -> tuple[list, list]:
    """``n`` simulation and ``n`` fuzz/detection prompts (one-token answers) of a request cache."""
    from metasae.autointerp.scorers import SIMULATION_EV_SYSTEM

    files = sorted(glob.glob(str(cache / "*" / "*")))
    random.Random(seed).shuffle(files)
    sim, binary = [], []
    for f in files:
        d = json.loads(Path(f).read_text())
        if d.get("params", {}).get("max_new_tokens") != 1:
            continue
        (sim if d["messages"][0]["content"] == SIMULATION_EV_SYSTEM else binary).append(d["messages"])
        if len(sim) >= n and len(binary) >= n:
            break
    return sim[:n], binary[:n]


def smooth_mlps(model, prompts: list, alpha: float) -> int:
    """SmoothQuant on every gated MLP, with max |x| per channel of ``down_proj``'s input over ``prompts``
    (token ids, 1 x T each).  Returns how many MLPs were smoothed."""
    import torch

    mlps = [m for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.nn.Linear)
            and isinstance(getattr(m, "up_proj", None), torch.nn.Linear)]
    amax: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            amax[i] = x if i not in amax else torch.maximum(amax[i], x)
        return record

    handles = [m.down_proj.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    with torch.no_grad():
        for ids in prompts:
            model(input_ids=ids)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for i, m in enumerate(mlps):
            wd, wu = m.down_proj.weight.detach().float(), m.up_proj.weight.detach().float()
            s = (amax[i].clamp_min(1e-5).pow(alpha) / wd.abs().amax(dim=0).clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
            m.down_proj.weight = torch.nn.Parameter(wd * s[None, :], requires_grad=False)  # float32 until int8
            m.up_proj.weight = torch.nn.Parameter(wu / s[:, None], requires_grad=False)
    return len(mlps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm-cache", required=True, help="a finished run's request cache (<run>/llm_cache)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--n", type=int, default=40, help="prompts of each kind (simulation, fuzz/detection)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="full,keep:down_proj,keep-layers:1,2,3,4,5,26,smooth:0.5,smooth:0.8")
    p.add_argument("--outliers", action="store_true", help="print down_proj's input outliers per layer")
    p.add_argument("--out", default="")
    a = p.parse_args()

    import torch

    from metasae.autointerp.int8 import quantize_linears
    from metasae.autointerp.llm import HFLocalClient
    from metasae.autointerp.scorers import binary_log_odds, expected_digit

    t0 = time.time()
    torch.set_num_threads(a.threads)
    sim, binary = draw_prompts(Path(a.llm_cache), a.n)
    if not sim or not binary:
        sys.exit(f"{a.llm_cache} holds no one-token judge prompts of both kinds: give a finished run's llm_cache")

    def answers(client):
        t = time.time()
        s = [expected_digit(c) for c in client.generate_batch(sim, 1, 0.0, True)]
        b = [binary_log_odds(c) for c in client.generate_batch(binary, 1, 0.0, True)]
        return s, b, time.time() - t

    ref = HFLocalClient(a.model)
    ids = [ref.tokenizer(ref._prompt(m), return_tensors="pt", add_special_tokens=False)["input_ids"]
           for m in sim[:8] + binary[:8]]
    res: dict = {"model": a.model, "n_simulation": len(sim), "n_binary": len(binary), "threads": a.threads,
                 "variants": {}}
    if a.outliers:
        ratio: dict[str, float] = {}

        def hook(name):
            def f(_mod, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs()
                r = float((x.amax(1) / x.median(1).values.clamp_min(1e-6)).max())
                ratio[name] = max(ratio.get(name, 0.0), r)
            return f

        hs = [m.register_forward_pre_hook(hook(n)) for n, m in ref.model.named_modules() if n.endswith("down_proj")]
        with torch.no_grad():
            for x in ids:
                ref.model(input_ids=x)
        for h in hs:
            h.remove()
        res["down_proj_input_max_over_median"] = {k: round(v) for k, v in ratio.items()}
    r_sim, r_bin, r_s = answers(ref)
    res["bf16_seconds"] = r_s
    del ref
    for v in _split_variants(a.variants):
        kind, _, arg = v.partition(":")
        if kind in ("full", "keep", "keep-layers"):  # as autointerp.local_int8 / int8_keep run them
            keep = {"full": [], "keep": arg.split("+"),
                    "keep-layers": [f"layers.{i}.mlp.down_proj" for i in arg.split(",")]}[kind]
            c = HFLocalClient(a.model, int8=True, int8_keep=keep)
        elif kind == "smooth":
            c = HFLocalClient(a.model)
            smooth_mlps(c.model, ids, float(arg))
            quantize_linears(c.model)
        else:
            sys.exit(f"unknown variant {v!r} (full, keep:NAMES, keep-layers:I,J, smooth:ALPHA)")
        s, b, sec = answers(c)
        ds = [abs(x - y) for x, y in zip(s, r_sim)]
        db = [abs(x - y) for x, y in zip(b, r_bin)]
        res["variants"][v] = {"sim_abs_change_mean": sum(ds) / len(ds), "sim_abs_change_max": max(ds),
                              "binary_abs_change_mean": sum(db) / len(db), "binary_abs_change_max": max(db),
                              "binary_sign_flips": sum((x > 0) != (y > 0) for x, y in zip(b, r_bin)),
                              "seconds": sec}
        print(v, json.dumps(res["variants"][v]), flush=True)
        del c
    finish(res, t0, a.out)


def _split_variants(text: str) -> list[str]:
    """``full,keep:down_proj,keep-layers:1,2,3,smooth:0.5`` split at the commas that start a variant."""
    out: list[str] = []
    for part in text.split(","):
        if out and part.isdigit() and out[-1].startswith("keep-layers:"):
            out[-1] += "," + part
        else:
            out.append(part)
    return out


if __name__ == "__main__":
    main()
