"""Training speed report: the library's training path against a dense float32 reference.

    python benchmarks/train.py [--out benchmarks/results/train.json] [--quick]

Prints one JSON object and a Markdown table (and writes both with --out).
Every speed-up is a ratio measured in this one run: library and reference
steps are interleaved on the same batches, so machine-load drift hits both.

What is timed (per variant, at the paper's shapes and at the default profile's):
* a primary step = forward + backward + Adam + decoder renormalisation
  (joint: including W_hat = meta(W_dec) recomputed under no_grad and the penalty);
* a meta step (joint only) = forward + backward + Adam of the meta SAE on W_dec.
Tokens/s of a joint run follow the schedule: B / (t_primary + n_m / n_p * t_meta).

FLOPs.  "Necessary" FLOPs per primary step are 2*B*d*n: the dense encoder
forward.  The encoder-weight gradient is sparse (k of n latents per token carry
gradient), and so is the decoder, so neither is a dense B x d x n product.  "Executed" FLOPs are what the library's sparse-gradient path does:
2*B*d*n (encoder GEMM) + 6*k*B*d (sparse encoder gradient, decoder forward and
its two gradients); a joint run adds 2*n*d*m + 2*k_m*n*d (the meta forward at
every primary step) and n_m/n_p * (2*n*d*m + 6*k_m*n*d) (its share of the meta
steps) per primary step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from reference import DenseJoint  # noqa: E402

from metasae.config import MetaConfig, RunSpec, SAEConfig, TrainConfig  # noqa: E402
from metasae.sae import _topk_flat_indices  # noqa: E402
from metasae.trainer import FanOutTrainer  # noqa: E402

PAPER = dict(name="paper (GPT-2 L)", d=1280, n=20480, m=1800, k=64, mk=8, B=4096)


def default_shape() -> dict:
    shape = dict(name="default profile", d=576, n=4608, m=414, k=32, mk=4, B=4096)
    prof = ROOT / "profiles" / "default.toml"
    if prof.is_file():
        raw = tomllib.loads(prof.read_text())
        sae, meta, train = raw.get("sae", {}), raw.get("meta", {}), raw.get("train", {})
        shape.update({k: v for k, v in dict(d=sae.get("d_in"), n=sae.get("n_latents"), k=sae.get("k"),
                                              m=meta.get("n_latents"), mk=meta.get("k"),
                                              B=train.get("batch_size")).items() if v})
        shape["source"] = "profiles/default.toml"
    else:
        shape["source"] = "built-in (profiles/default.toml absent)"
    if shape["d"] in (0, None):
        shape["d"] = 576
    return shape


# ---------------------------------------------------------------------------
# data: a fixed synthetic stream with sparse structure (same batches for all)
# ---------------------------------------------------------------------------

class Stream:
    def __init__(self, d: int, B: int, n_feat: int = 4096, active: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.D = torch.randn(n_feat, d, generator=g)
        self.D /= self.D.norm(dim=1, keepdim=True)
        self.mean = torch.randn(d, generator=g) * 0.5
        self.d, self.B, self.n_feat, self.active, self.seed = d, B, n_feat, active, seed

    def batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randint(0, self.n_feat, (self.B * self.active,), generator=g)
        w = torch.rand(self.B * self.active, generator=g) * 2
        off = torch.arange(self.B) * self.active
        x = torch.nn.functional.embedding_bag(idx, self.D, off, mode="sum", per_sample_weights=w)
        return x + self.mean + 0.05 * torch.randn(self.B, self.d, generator=g)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gemm_peak(B: int, d: int, n: int, reps: int = 3) -> dict:
    a, w = torch.randn(B, d), torch.randn(d, n)
    ab, wb = a.bfloat16(), w.bfloat16()
    out = {}
    for name, (x, y) in {"fp32": (a, w), "bf16": (ab, wb)}.items():
        x @ y
        ts = [_timed(lambda: x @ y) for _ in range(reps)]
        out[name] = 2 * B * d * n / min(ts) / 1e9
    return out


def make_trainer(s: dict, autocast: str, lambda2: float = 0.3, sigma2: float = 1.0):
    sae_cfg = SAEConfig(d_in=s["d"], n_latents=s["n"], k=s["k"])
    meta_cfg = MetaConfig(n_latents=s["m"], k=s["mk"])
    runs = [RunSpec("solo", "solo", 0), RunSpec("joint", "joint", 0, lambda2, sigma2)]
    tr = FanOutTrainer(sae_cfg, meta_cfg, TrainConfig(batch_size=s["B"], autocast=autocast), runs, progress=False)
    return tr, [tr._fresh_state(r) for r in runs]


def flops(s: dict, n_p: int = 10, n_m: int = 5) -> dict:
    B, d, n, m, k, mk = s["B"], s["d"], s["n"], s["m"], s["k"], s["mk"]
    necessary = 2 * B * d * n
    primary = 2 * B * d * n + 6 * k * B * d
    meta_fwd = 2 * n * d * m + 2 * mk * n * d
    meta_train = 2 * n * d * m + 6 * mk * n * d
    return {"necessary_per_step": necessary, "executed_solo": primary,
            "executed_joint": primary + meta_fwd + n_m / n_p * meta_train,
            "meta_forward_per_step": meta_fwd, "dense_reference_solo": 12 * B * d * n}


# ---------------------------------------------------------------------------
# speed: interleaved steps, library vs dense reference
# ---------------------------------------------------------------------------

def speed(s: dict, warmup: int, steps: int, meta_warmup: int, meta_steps: int, with_ref: bool = True) -> dict:
    torch.manual_seed(0)
    stream = Stream(s["d"], s["B"])
    tr, (solo, joint) = make_trainer(s, "bfloat16")
    ref_solo = DenseJoint(solo.primary) if with_ref else None
    ref_joint = DenseJoint(joint.primary, joint.meta, 0.3, 1.0) if with_ref else None
    times: dict[str, list[float]] = {k: [] for k in ("ours_solo", "ours_joint", "ref_solo", "ref_joint",
                                                     "ours_meta", "ref_meta")}
    for i in range(warmup + steps):
        x = stream.batch(i)
        keep = i >= warmup

        def ours(st):
            xn = st.primary.standardize(x)
            tr._primary_step(st, x, xn, i, False)

        for name, fn in (("ours_solo", lambda: ours(solo)), ("ref_solo", lambda: ref_solo.primary_step(x)),
                         ("ours_joint", lambda: ours(joint)), ("ref_joint", lambda: ref_joint.primary_step(x))):
            if name.startswith("ref") and not with_ref:
                continue
            t = _timed(fn)
            if keep:
                times[name].append(t)
    for j in range(meta_warmup + meta_steps):
        t1 = _timed(lambda: tr._meta_step(joint, 0, j))
        t2 = _timed(lambda: ref_joint.meta_step()) if with_ref else float("nan")
        if j >= meta_warmup:
            times["ours_meta"].append(t1)
            times["ref_meta"].append(t2)
    med = {k: (statistics.median(v) if v else float("nan")) for k, v in times.items()}
    n_p, n_m, B = 10, 5, s["B"]
    tok = {
        "ours_solo": B / med["ours_solo"],
        "ours_joint": B / (med["ours_joint"] + n_m / n_p * med["ours_meta"]),
        "ref_solo": B / med["ref_solo"] if with_ref else float("nan"),
        "ref_joint": B / (med["ref_joint"] + n_m / n_p * med["ref_meta"]) if with_ref else float("nan"),
    }
    return {"shape": s, "median_step_s": med, "raw_step_s": times, "tokens_per_s": tok}


# ---------------------------------------------------------------------------
# loss parity: full trainer loop vs the dense reference, same batches
# ---------------------------------------------------------------------------

def parity(s: dict, n_steps: int) -> dict:
    stream = Stream(s["d"], s["B"], seed=1)
    out = {"shape": s, "steps": n_steps, "lambda2": 0.3, "sigma2": 1.0}
    for autocast in ("none", "bfloat16"):
        tr, _ = make_trainer(s, autocast)
        t0 = time.perf_counter()
        states = tr.train(lambda start: (stream.batch(i) for i in range(start, n_steps)), n_steps)
        wall = time.perf_counter() - t0
        for st in states:
            out[f"ours_{autocast}_{st.spec.name}"] = {"loss": st.history[-1]["loss"], "mse": st.history[-1]["mse"]}
        out[f"ours_{autocast}_wall_s"] = wall
    tr, (solo, joint) = make_trainer(s, "none")
    ref = {"solo": DenseJoint(solo.primary), "joint": DenseJoint(joint.primary, joint.meta, 0.3, 1.0)}
    t0 = time.perf_counter()
    for name, r in ref.items():
        loss = float("nan")
        for i in range(n_steps):
            loss = r.primary_step(stream.batch(i))
            if r.meta is not None and (i + 1) % 10 == 0:
                for _ in range(5):
                    r.meta_step()
        out[f"ref_{name}"] = {"loss": loss}
    out["ref_wall_s"] = time.perf_counter() - t0
    for name in ("solo", "joint"):
        rl = out[f"ref_{name}"]["loss"]
        for ac in ("none", "bfloat16"):
            out[f"rel_diff_{ac}_{name}"] = out[f"ours_{ac}_{name}"]["loss"] / rl - 1
    return out


# ---------------------------------------------------------------------------
# component measurements at one shape
# ---------------------------------------------------------------------------

def components(s: dict) -> dict:
    B, d, n, k = s["B"], s["d"], s["n"], s["k"]
    torch.manual_seed(0)
    tr, (solo, _) = make_trainer(s, "bfloat16")
    sae = solo.primary
    x = Stream(d, B).batch(0)
    x_n, _, _ = sae.standardize(x)
    res = {}
    res["encoder_gemm_bf16_s"] = _timed(lambda: sae._pre_from_normalized(x_n, True, keep_dtype=True))
    pre = sae._pre_from_normalized(x_n, True, keep_dtype=True)
    kk = k * B
    res["topk_full_flat_s"] = _timed(lambda: torch.topk(pre.reshape(-1), kk, sorted=False))
    res["topk_candidates_s"] = _timed(lambda: _topk_flat_indices(pre, kk))
    sel = sae.select(pre)
    g = torch.rand(sel.f_idx.numel())
    xc = x_n - sae.b_dec_D.detach()

    def coo():
        S = torch.sparse_coo_tensor(torch.stack([sel.f_idx, sel.b_idx]), g, (n, B), check_invariants=False)
        return torch.sparse.mm(S, xc)

    def csr():
        order = torch.argsort(sel.f_idx, stable=True)
        crow = torch.zeros(n + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(torch.bincount(sel.f_idx, minlength=n), 0)
        S = torch.sparse_csr_tensor(crow, sel.b_idx[order], g[order], (n, B))
        return S @ xc

    def index_add():
        out = torch.zeros(n, d)
        for st in range(0, g.numel(), 32768):
            e = slice(st, st + 32768)
            out.index_add_(0, sel.f_idx[e], xc.index_select(0, sel.b_idx[e]) * g[e, None])
        return out

    ref = coo()
    for name, fn in (("enc_grad_coo_s", coo), ("enc_grad_csr_s", csr), ("enc_grad_index_add_s", index_add)):
        fn()
        res[name] = _timed(fn)
        res[name.replace("_s", "_max_abs_diff")] = float((fn() - ref).abs().max())
    # two SAEs' encoders as one GEMM vs two
    W1, W2 = sae.W_enc_DF.detach().bfloat16(), sae.W_enc_DF.detach().bfloat16().clone()
    xb = xc.bfloat16()
    W12 = torch.cat([W1, W2], 1)
    xb @ W1
    res["two_gemms_s"] = _timed(lambda: (xb @ W1, xb @ W2))
    res["one_concat_gemm_s"] = _timed(lambda: xb @ W12)
    res["concat_copy_s"] = _timed(lambda: torch.cat([W1, W2], 1))
    return res


def profile_steps(s: dict, steps: int = 2) -> str:
    from torch.profiler import ProfilerActivity, profile
    tr, (solo, joint) = make_trainer(s, "bfloat16")
    x = Stream(s["d"], s["B"]).batch(0)
    tr._primary_step(joint, x, joint.primary.standardize(x), 0, False)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for i in range(steps):
            tr._primary_step(joint, x, joint.primary.standardize(x), i, False)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def others() -> dict:
    res = {}
    for name in ("harvest", "phi"):
        p = HERE / f"{name}.py"
        res[name] = f"see `python benchmarks/{name}.py`" if p.is_file() else "not measured (benchmarks/" \
            f"{name}.py absent when this report was made)"
    pt = HERE / "results" / "profile_times.json"
    res["profile_times"] = json.loads(pt.read_text()) if pt.is_file() else \
        "not recorded (benchmarks/results/profile_times.json absent)"
    return res


# ---------------------------------------------------------------------------

def markdown(rep: dict) -> str:
    L = []
    peak = rep["gemm_peak_gflops"]
    L.append(f"GEMM peak measured in this run (4096x1280 @ 1280x20480): fp32 {peak['fp32']:.0f} GFLOP/s, "
             f"bf16 {peak['bf16']:.0f} GFLOP/s; torch threads {rep['threads']}; load average "
             f"{rep.get('loadavg_start', [float('nan')])[0]:.2f} at the start, "
             f"{rep.get('loadavg_end', [float('nan')])[0]:.2f} at the end.\n")
    L.append("| shape | variant | ours tok/s | dense ref tok/s | speed-up | necessary GFLOP/s (2Bdn) | % bf16 peak | "
             "% fp32 peak | executed GFLOP/s |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in ("paper", "default"):
        sp = rep["speed"].get(key)
        if not sp:
            continue
        fl = rep["flops"][key]
        for v in ("solo", "joint"):
            ours, ref = sp["tokens_per_s"][f"ours_{v}"], sp["tokens_per_s"][f"ref_{v}"]
            steps_s = ours / sp["shape"]["B"]
            nec = fl["necessary_per_step"] * steps_s / 1e9
            exe = fl[f"executed_{v}"] * steps_s / 1e9
            L.append(f"| {sp['shape']['name']} | {v} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.1f}x | {nec:.0f} | "
                     f"{100 * nec / peak['bf16']:.0f}% | {100 * nec / peak['fp32']:.0f}% | {exe:.0f} |")
        L.append(f"| {sp['shape']['name']} | joint/solo time | {sp['tokens_per_s']['ours_solo'] / sp['tokens_per_s']['ours_joint']:.2f} | "
                 f"{sp['tokens_per_s']['ref_solo'] / sp['tokens_per_s']['ref_joint']:.2f} | | | | | |")
    par = rep.get("parity")
    if par:
        L.append(f"\nLoss parity ({par['shape']['name']} shape, {par['steps']} steps, same batches, joint "
                 f"lambda2={par['lambda2']} sigma2={par['sigma2']}):\n")
        L.append("| variant | dense ref fp32 | ours fp32 | ours bf16 autocast | rel. diff fp32 | rel. diff bf16 |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for v in ("solo", "joint"):
            L.append(f"| {v} | {par[f'ref_{v}']['loss']:.5f} | {par[f'ours_none_{v}']['loss']:.5f} | "
                     f"{par[f'ours_bfloat16_{v}']['loss']:.5f} | {100 * par[f'rel_diff_none_{v}']:+.2f}% | "
                     f"{100 * par[f'rel_diff_bfloat16_{v}']:+.2f}% |")
    comp = rep.get("components")
    if comp:
        L.append("\nComponents at paper shape (seconds, one call each):\n")
        L.append("| component | s |")
        L.append("|---|---:|")
        for k2, v in comp.items():
            L.append(f"| {k2} | {v:.3g} |")
    L.append("\nOther throughputs: " + json.dumps(rep["others"]))
    return "\n".join(L)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write <out>.json and <out>.md")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed primary steps per variant at each shape")
    ap.add_argument("--parity-steps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="default-profile shape only, no paper shape")
    ap.add_argument("--no-ref-paper", action="store_true", help="skip the (slow) dense reference at paper shape")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of joint steps at paper shape")
    args = ap.parse_args()
    threads = int(os.environ.get("METASAE_THREADS", 0)) or torch.get_num_threads()
    torch.set_num_threads(threads)
    dflt = default_shape()
    rep = {"machine": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
           "loadavg_start": os.getloadavg(),
           "flop_definition": "necessary = 2*B*d*n per primary step (the dense encoder forward; the "
                              "encoder-weight gradient and the decoder are sparse); executed = the sparse path's 2*B*d*n + 6*k*B*d (+ meta forward "
                              "2*n*d*m + 2*k_m*n*d every primary step and n_m/n_p meta steps for joint)",
           "speed": {}, "flops": {"paper": flops(PAPER), "default": flops(dflt)}}
    peaks = [gemm_peak(4096, 1280, 20480)]
    rep["speed"]["default"] = speed(dflt, args.warmup, args.steps + 2, 1, 3)
    if not args.quick:
        rep["speed"]["paper"] = speed(PAPER, args.warmup, args.steps, 1, 2, with_ref=not args.no_ref_paper)
        rep["components"] = components(PAPER)
        if args.profile:
            print(profile_steps(PAPER), file=sys.stderr)
    peaks.append(gemm_peak(4096, 1280, 20480))
    rep["gemm_peak_gflops"] = {k: max(p[k] for p in peaks) for k in ("fp32", "bf16")}
    rep["gemm_peak_samples"] = peaks
    if args.parity_steps > 0:
        rep["parity"] = parity(dflt, args.parity_steps)
    rep["others"] = others()
    rep["loadavg_end"] = os.getloadavg()
    md = markdown(rep)
    print(json.dumps(rep, indent=1, default=float))
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rep, indent=1, default=float))
        out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
