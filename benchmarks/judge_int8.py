"""The judge's linear layers in bf16 against int8 (dynamic quantisation), on this CPU.

    python benchmarks/judge_int8.py [--tokens 512] [--threads 1] [--repeats 5] [--out FILE]

The offline judge (Qwen2.5-Coder-1.5B) spends its time in the matrix products of its
linear layers (``benchmarks/README.md``, "The judge's one-token answers"), so its speed
follows the CPU's bf16 GEMM rate: about three times higher with AMX than with AVX-512
BF16 alone.  This measures, at the judge's layer shapes (hidden 1536, MLP 8960, KV 256)
and a prompt-sized batch of tokens, the seconds per layer and GFLOP/s of: ``F.linear`` in
bf16 (what the judge runs), in float32, and ``torch.ao.quantization.quantize_dynamic``'s
int8 ``Linear`` (int8 weights, activations quantised per call; VNNI / AMX-INT8 kernels).
It also reports the int8 layer's relative error against float32 on the same random input.
Nothing here changes the judge; a switch to int8 would need the validation set measured
again.  Prints one JSON object (load average included) and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402

SHAPES = {"q_proj / o_proj": (1536, 1536), "k_proj / v_proj": (1536, 256), "gate / up_proj": (1536, 8960),
          "down_proj": (8960, 1536)}
"""(in, out) features of the judge's linear layers (Qwen2.5-1.5B: hidden 1536, MLP 8960, 2 KV heads of 128)."""


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens per call (a prompt's prefill)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    a = p.parse_args()

    import torch

    t0 = time.time()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    res: dict = {"tokens": a.tokens, "threads": a.threads, "torch": torch.__version__, "layers": {}}
    res["cpu"] = cpu_info()
    tot = {"bf16": 0.0, "float32": 0.0, "int8_dynamic": 0.0}
    flops_all = 0.0
    for name, (fin, fout) in SHAPES.items():
        x = torch.randn(a.tokens, fin, generator=g)
        lin = torch.nn.Linear(fin, fout, bias=name != "down_proj")
        with torch.no_grad():
            lin.weight.normal_(0, fin ** -0.5, generator=g)
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        xb, wb = x.bfloat16(), lin.weight.detach().bfloat16()
        bb = None if lin.bias is None else lin.bias.detach().bfloat16()
        flops = 2.0 * a.tokens * fin * fout
        flops_all += flops
        with torch.no_grad():
            s = {"bf16": best_seconds(lambda: torch.nn.functional.linear(xb, wb, bb), a.repeats),
                 "float32": best_seconds(lambda: lin(x), a.repeats),
                 "int8_dynamic": best_seconds(lambda: q(x), a.repeats)}
            ref = lin(x)
            err = float((q(x) - ref).norm() / ref.norm())
            err_bf16 = float((torch.nn.functional.linear(xb, wb, bb).float() - ref).norm() / ref.norm())
        for k in tot:
            tot[k] += s[k]
        res["layers"][name] = {"in": fin, "out": fout, "seconds": s,
                               "gflop_per_s": {k: flops / v / 1e9 for k, v in s.items()},
                               "rel_error_vs_float32": {"int8_dynamic": err, "bf16": err_bf16}}
    res["one_of_each_layer"] = {"seconds": tot, "gflop_per_s": {k: flops_all / v / 1e9 for k, v in tot.items()},
                                "int8_speedup_vs_bf16": tot["bf16"] / tot["int8_dynamic"]}
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
