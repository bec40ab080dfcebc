"""Fan-out training speed at the default profile's shape: the trainer of this tree against the
trainer of an earlier commit, in one run.

    python benchmarks/fanout.py [--baseline 253bae7] [--cache outputs/default/activations]
                                [--steps 20] [--warmup 25] [--out benchmarks/results/fanout.json]

What is compared (SAE-tokens/s = SAEs x tokens / wall second, every SAE of a default run):

* ``baseline, 1 process x 2 threads``: the earlier commit's ``FanOutTrainer`` as the default
  profile ran it (one process, all cores), on seed 0's run list (15 SAEs);
* ``baseline, 2 processes x 1 thread`` and ``new, 1 process x 2 threads``: each change alone;
* ``new, 2 processes x 1 thread``: how ``bash run_all.sh`` trains now (``--jobs 2``): one
  process trains seed 0's 15 SAEs while the other trains the 16 SAEs of seeds 1-4
  (solo, replicated joint, lambda2 = 0 control, independent solo each), one torch thread each,
  as ``FanOutTrainer.train`` runs them: the allocator set to keep freed memory
  (``metasae.allocator``) and each lambda2 = 0 control on its solo's primary (trained once);
* ``new, 2 processes x 1 thread, the control's primary trained too``: the same without that
  sharing (``speedup_vs_loop_control_primary_trained``), every SAE's primary stepped.

All variants train the same math (tests/test_core.py checks the gradients) on the same
batches, from the same state: the new trainer first trains every SAE for ``--warmup`` steps
(the first few hundred steps of a fresh SAE are dominated by dead latents and AuxK, a
regime that is over after ~200 of the default's 2,282 steps), the weights and dead-latent
counters are saved (safetensors) and every variant loads them; then 3 untimed and
``--steps`` timed steps run.  ``--warmup 0`` times fresh SAEs instead.  The data are the
default profile's cached activations when ``--cache`` holds them, else a synthetic stream.

FLOPs.  Necessary FLOPs per primary step and SAE: 2*B*d*n (the dense encoder GEMM; the encoder
weight gradient is sparse, k of n per token, and so is the decoder); none for a primary that
another run's is (the control's).  A joint SAE also needs n_m/n_p meta steps, 2*n*d*m each
(counted as one forward), and with lambda2 > 0 the meta forward on the n decoder rows at every
primary step, 2*n*d*m; an orthogonality SAE the n x n decoder Gram matrix, 2*n^2*d.  ``frac_bf16_peak``
divides the necessary FLOP/s of the ``new, 2 processes`` variant by the bf16 GEMM peak of the
machine measured in this run (two concurrent 1-thread processes, the same layout).

The component table times each part of one step of the new trainer (1 thread) on a trained-in
state: encoder GEMM, BatchTopK selection, sparse decode, backward, AuxK, the decomposability
penalty (meta forward), the orthogonality penalty, the optimiser, and evaluation (one
evaluation encoder pass per batch).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

LEGACY_MODULES = ("sae", "trainer", "checkpoint")


def default_shape() -> dict:
    raw = tomllib.loads((ROOT / "profiles" / "default.toml").read_text())
    sae, meta, train = raw["sae"], raw["meta"], raw["train"]
    return dict(d=576, n=sae["n_latents"], k=sae["k"], aux_k=sae["aux_k"], dead_after=sae["dead_after_tokens"],
                lr=sae.get("lr", 3e-4), m=meta["n_latents"], mk=meta["k"], n_p=meta["n_primary_steps"],
                n_m=meta["n_meta_steps"], B=train["batch_size"])


def install_legacy(commit: str, dest: Path) -> None:
    """Write the earlier commit's sae/trainer/checkpoint as package ``legacy_metasae`` under `dest`."""
    pkg = dest / "legacy_metasae"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for m in LEGACY_MODULES:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:metasae/{m}.py"], check=True,
                             capture_output=True, text=True).stdout
        for mm in LEGACY_MODULES:
            src = src.replace(f"from metasae.{mm} import", f"from legacy_metasae.{mm} import")
        (pkg / f"{m}.py").write_text(src)


# ---------------------------------------------------------------------------
# one worker: train a run list for warmup + steps, print timings as JSON
# ---------------------------------------------------------------------------

def run_lists(shape: dict) -> dict[str, list]:
    from metasae.config import load_profile

    prof = load_profile("default")
    seed0 = prof.runs_for_seed(prof.seeds[0])
    rest = []
    for s in prof.seeds[1:]:
        for r in prof.runs_for_seed(s):
            r.name = f"{r.name}_seed{s}"
            rest.append(r)
    return {"seed0": seed0, "rest": rest}


def batches_for(shape: dict, cache_dir: str, n: int):
    import torch

    if cache_dir and (Path(cache_dir) / "manifest.json").is_file():
        from metasae.activations.cache import open_cache

        c = open_cache(Path(cache_dir))
        it = c.iter_batches("train", shape["B"], seed=0)
        return [next(it) for _ in range(n)], f"cached activations ({cache_dir})"
    g = torch.Generator().manual_seed(0)
    D = torch.randn(4 * shape["n"], shape["d"], generator=g)
    D /= D.norm(dim=1, keepdim=True)
    out = []
    for _ in range(n):
        idx = torch.randint(0, D.shape[0], (shape["B"], 24), generator=g)
        coef = torch.rand(shape["B"], 24, generator=g) * 3
        out.append((coef.unsqueeze(-1) * D[idx]).sum(1) + 0.1 * torch.randn(shape["B"], shape["d"], generator=g))
    return out, "synthetic sparse stream"


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.impl == "baseline":
        sys.path.insert(0, args.legacy_dir)
        trainer_mod = importlib.import_module("legacy_metasae.trainer")
    else:
        trainer_mod = importlib.import_module("metasae.trainer")
    from metasae.config import MetaConfig, SAEConfig, TrainConfig

    shape = default_shape()
    runs = run_lists(shape)[args.runs]
    sae_cfg = SAEConfig(d_in=shape["d"], n_latents=shape["n"], k=shape["k"], aux_k=shape["aux_k"],
                        dead_after_tokens=shape["dead_after"], lr=shape["lr"])
    meta_cfg = MetaConfig(n_latents=shape["m"], k=shape["mk"], n_primary_steps=shape["n_p"],
                          n_meta_steps=shape["n_m"])
    train_cfg = TrainConfig(batch_size=shape["B"], checkpoint_every_steps=10 ** 9, eval_every_steps=10 ** 9)
    tr = trainer_mod.FanOutTrainer(sae_cfg, meta_cfg, train_cfg, runs, progress=False)
    states = [tr._fresh_state(r) for r in runs]
    if args.impl == "new":  # as FanOutTrainer.train runs: the allocator kept, the control on the solo's primary
        from metasae.allocator import keep_freed_memory

        keep_freed_memory()
        if not args.no_share:
            states = tr._link_shared(states)
    n_p, n_m = shape["n_p"], shape["n_m"]
    state_file = Path(args.state_dir) / f"{args.runs}.safetensors" if args.state_dir else None
    from safetensors.torch import load_file, save_file

    if args.save_state:  # the warm-up worker: train, then save every SAE's state for the timed workers
        first, untimed = 0, args.warmup
    else:
        first, untimed = args.warmup, 3
        if state_file is not None and state_file.is_file():
            saved = load_file(str(state_file))
            with torch.no_grad():
                for st in states:
                    for role, sae in (("p", st.primary), ("m", st.meta)):
                        if sae is None:
                            continue
                        for name in ("W_enc_DF", "W_dec_FD", "b_dec_D", "threshold", "since_fired_F"):
                            getattr(sae, name).copy_(saved[f"{st.spec.name}.{role}.{name}"].reshape(
                                getattr(sae, name).shape))
    total = first + untimed + (0 if args.save_state else args.steps)
    data, source = batches_for(shape, args.cache, total)
    t0 = None
    for step in range(first, total):
        if step == first + untimed:
            t0 = time.perf_counter()
        x = data[step].float()
        x_norm = states[0].primary.standardize(x)
        for st in states:
            if getattr(st, "owner", None) is None:
                tr._primary_step(st, x, x_norm, step, False)
            if st.meta is not None and (step + 1) % n_p == 0:
                for j in range(n_m):
                    tr._meta_step(st, step, j)
    if args.save_state:
        tensors = {}
        for st in states:
            for role, sae in (("p", st.primary), ("m", st.meta)):
                if sae is not None:
                    for name in ("W_enc_DF", "W_dec_FD", "b_dec_D", "threshold", "since_fired_F"):
                        tensors[f"{st.spec.name}.{role}.{name}"] = getattr(sae, name).detach().reshape(-1).clone()
        save_file(tensors, str(state_file))
        print(json.dumps({"saved": str(state_file)}))
        return
    dt = time.perf_counter() - t0
    dead = [int((st.primary.since_fired_F >= sae_cfg.dead_after_tokens).sum()) for st in states]
    print(json.dumps({"impl": args.impl, "runs": args.runs, "n_runs": len(runs), "threads": args.threads,
                      "steps": args.steps, "seconds": dt, "sae_tokens_per_s": len(runs) * shape["B"] * args.steps / dt,
                      "dead_frac_mean": sum(dead) / len(dead) / shape["n"], "data": source,
                      "loadavg": os.getloadavg()}))


def gemm_worker(args) -> None:
    import torch

    from metasae.machine import gemm_gflops  # the run's own probe: the same shape, best of 3

    torch.set_num_threads(args.threads)
    print(json.dumps({"gflops": gemm_gflops()}))


# ---------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------

def spawn(extra: list[str], n: int = 1, lists: list[str] | None = None) -> list[dict]:
    procs = []
    for i in range(n):
        cmd = [sys.executable, __file__, *extra]
        if lists:
            cmd += ["--runs", lists[i]]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": extra[extra.index("--threads") + 1]}))
    out = []
    for p in procs:
        so, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"benchmark worker failed: {' '.join(extra)}")
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def components(shape: dict, cache: str) -> dict[str, float]:
    """Seconds per call of each part of one primary step of the new trainer (1 thread)."""
    import torch

    from metasae.config import MetaConfig, RunSpec, SAEConfig, TrainConfig
    from metasae.sae import decomposability_penalty_grad_, meta_reconstruction, orthogonality_penalty_grad_
    from metasae.trainer import FanOutTrainer

    torch.set_num_threads(1)
    cfg = SAEConfig(d_in=shape["d"], n_latents=shape["n"], k=shape["k"], aux_k=shape["aux_k"],
                    dead_after_tokens=shape["dead_after"], lr=shape["lr"])
    mcfg = MetaConfig(n_latents=shape["m"], k=shape["mk"])
    tr = FanOutTrainer(cfg, mcfg, TrainConfig(batch_size=shape["B"], eval_every_steps=10 ** 9,
                                              checkpoint_every_steps=10 ** 9),
                       [RunSpec("j", "joint", 0, 0.3, 1.0)], progress=False)
    st = tr._fresh_state(tr.runs[0])
    data, _ = batches_for(shape, cache, 30)
    for i in range(30):
        x = data[i].float()
        tr._primary_step(st, x, None, i, False)
        if (i + 1) % 10 == 0:
            for j in range(5):
                tr._meta_step(st, i, j)
    sae = st.primary
    x = data[0].float()

    def timeit(fn, reps=10):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps

    x_n, _, _ = sae.standardize(x)
    pre = sae._pre_from_normalized(x_n, True, keep_dtype=True)
    sel = sae.select(pre)
    # the steady state of a trained SAE (no dead latent; 30 warm-up steps leave many): the
    # AuxK row adds 10% dead latents
    sae.since_fired_F.zero_()
    counters = sae.since_fired_F.clone()
    dead10 = counters.clone()
    dead10[: int(0.1 * shape["n"])] = 10 ** 9  # 10% dead latents for the AuxK timing

    def step_with(since):
        def fn():
            sae.since_fired_F.copy_(since)
            sae.train_step(x, True)
        return fn

    def full_step():
        sae.since_fired_F.copy_(counters)
        tr._primary_step(st, x, None, 0, False)

    t_fwd_bwd = timeit(step_with(counters))
    t_aux = timeit(step_with(dead10)) - t_fwd_bwd
    sae.since_fired_F.copy_(counters)
    W_hat = meta_reconstruction(st.meta, sae.W_dec_FD, True)
    out = {
        "encoder_gemm_bf16": timeit(lambda: sae._pre_from_normalized(x_n, True, keep_dtype=True)),
        "batchtopk_select": timeit(lambda: sae.select(pre)),
        "decode_sparse_fwd": timeit(lambda: sae._decode_sparse(sel.f_idx, sel.offsets, pre[sel.b_idx, sel.f_idx].float(),
                                                               sae.W_dec_FD)),
        "forward_backward_train_step": t_fwd_bwd,
        "auxk_10pct_dead": t_aux,
        "penalty_meta_forward": timeit(lambda: decomposability_penalty_grad_(
            sae.W_dec_FD, meta_reconstruction(st.meta, sae.W_dec_FD, True), 1.0, 0.3)),
        "meta_step": timeit(lambda: tr._meta_step(st, 0, 0)),
        "ortho_penalty_fwd_bwd": timeit(lambda: orthogonality_penalty_grad_(sae.W_dec_FD, 0.3), 5),
        "optimiser_step": timeit(lambda: st.opt.step()),
        "evaluation_pass": timeit(lambda: sae.evaluate_batch(x)),
        "full_primary_step_joint": timeit(full_step),
    }
    del W_hat
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="253bae7", help="commit whose trainer is the baseline")
    ap.add_argument("--cache", default=str(ROOT / "outputs" / "default" / "activations"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--runs", default="seed0", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--legacy-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--state-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--save-state", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-share", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.gemm:
        return gemm_worker(args)

    shape = default_shape()
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        install_legacy(args.baseline, Path(tmp))
        common = ["--worker", "--steps", str(args.steps), "--warmup", str(args.warmup), "--cache", args.cache,
                  "--legacy-dir", tmp, "--state-dir", tmp]
        if args.warmup:
            spawn(common + ["--impl", "new", "--threads", "1", "--save-state"], 2, ["seed0", "rest"])
        peak2 = sum(r["gflops"] for r in spawn(["--gemm", "--threads", "1"], 2))
        peak1x2 = spawn(["--gemm", "--threads", "2"])[0]["gflops"]
        base_1p = spawn(common + ["--impl", "baseline", "--threads", "2"], 1, ["seed0"])
        new_2p = spawn(common + ["--impl", "new", "--threads", "1"], 2, ["seed0", "rest"])
        new_1p = spawn(common + ["--impl", "new", "--threads", "2"], 1, ["seed0"])
        new_2p_own = spawn(common + ["--impl", "new", "--threads", "1", "--no-share"], 2, ["seed0", "rest"])
        base_2p = spawn(common + ["--impl", "baseline", "--threads", "1"], 2, ["seed0", "rest"])
    comp = components(shape, args.cache)
    load1 = os.getloadavg()

    def total(rs):  # concurrent processes: all SAE-tokens over the slowest process's time
        return sum(r["n_runs"] for r in rs) * shape["B"] * args.steps / max(r["seconds"] for r in rs)

    variants = {
        "baseline, 1 process x 2 threads (seed 0's 15 SAEs)": total(base_1p),
        "baseline, 2 processes x 1 thread (31 SAEs)": total(base_2p),
        "new, 1 process x 2 threads (seed 0's 15 SAEs)": total(new_1p),
        "new, 2 processes x 1 thread (31 SAEs; run_all.sh)": total(new_2p),
        "new, 2 processes x 1 thread (31 SAEs, the control's primary trained too)": total(new_2p_own),
    }
    B, d, n, m = shape["B"], shape["d"], shape["n"], shape["m"]
    from metasae.config import load_profile

    prof = load_profile("default")
    from metasae.config import primary_owner

    runs_all = [r for s in prof.seeds for r in prof.runs_for_seed(s)]
    meta_steps = shape["n_m"] / shape["n_p"] * 2 * n * d * m  # the meta SAE's steps, per primary step

    def flops(r, runs) -> float:  # necessary FLOPs of one primary step of run r
        own = 0 if primary_owner(r, runs) is not None else 2 * B * d * n  # a shared primary: none of its own
        if r.kind == "joint":
            return own + meta_steps + (2 * n * d * m if r.lambda2 > 0 else 0)  # the penalty's meta forward
        return own + (2 * n * n * d if r.kind == "ortho" else 0)

    # one step of every SAE of the default run
    per_step = sum(flops(r, prof.runs_for_seed(s)) for s in prof.seeds for r in prof.runs_for_seed(s))
    t_step = max(r["seconds"] for r in new_2p) / args.steps
    necessary_gflops = per_step / t_step / 1e9
    result = {
        "speedup_vs_loop": variants["new, 2 processes x 1 thread (31 SAEs; run_all.sh)"]
        / variants["baseline, 1 process x 2 threads (seed 0's 15 SAEs)"],
        "speedup_same_layout_1proc": variants["new, 1 process x 2 threads (seed 0's 15 SAEs)"]
        / variants["baseline, 1 process x 2 threads (seed 0's 15 SAEs)"],
        "speedup_same_layout_2proc": variants["new, 2 processes x 1 thread (31 SAEs; run_all.sh)"]
        / variants["baseline, 2 processes x 1 thread (31 SAEs)"],
        "frac_bf16_peak": necessary_gflops / peak2,
        "necessary_gflop_per_s": necessary_gflops,
        "bf16_peak_gflop_per_s_2x1thread": peak2,
        "bf16_peak_gflop_per_s_1x2threads": peak1x2,
        "sae_tokens_per_s": variants,
        "runs": {"seed0": [r.name for r in prof.runs_for_seed(prof.seeds[0])],
                 "per_other_seed": [r.name for r in prof.runs_for_seed(prof.seeds[1])],
                 "seeds": prof.seeds, "total_saes": len(runs_all)},
        "shape": shape, "steps_timed": args.steps, "warmup_steps": args.warmup, "baseline_commit": args.baseline,
        "data": new_2p[0]["data"], "dead_frac_mean_new": new_2p[0]["dead_frac_mean"],
        "dead_frac_mean_baseline": base_1p[0]["dead_frac_mean"],
        "components_s": comp,
        "loadavg": {"start": load0, "end": load1},
        "speedup_vs_loop_control_primary_trained": variants[
            "new, 2 processes x 1 thread (31 SAEs, the control's primary trained too)"]
        / variants["baseline, 1 process x 2 threads (seed 0's 15 SAEs)"],
        "workers": {"baseline_1p": base_1p, "baseline_2p": base_2p, "new_1p": new_1p, "new_2p": new_2p,
                    "new_2p_control_primary_trained": new_2p_own},
    }
    print(json.dumps(result, indent=2))
    lines = ["| variant | SAE-tokens/s |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in variants.items()]
    lines += ["", f"speed-up vs the baseline as it ran: {result['speedup_vs_loop']:.2f}x; necessary FLOP/s "
              f"{necessary_gflops:.0f} GFLOP/s = {100 * result['frac_bf16_peak']:.0f}% of the bf16 GEMM peak "
              f"({peak2:.0f} GFLOP/s, two 1-thread processes); load average {load0[0]:.2f} -> {load1[0]:.2f}", "",
              "| component (1 thread, one call) | ms |", "|---|---:|"]
    lines += [f"| {k} | {1000 * v:.1f} |" for k, v in comp.items()]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
