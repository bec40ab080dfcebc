"""Why does the meta SAE explain so little of the primary's decoder rows?  A probe on a finished run.

    python benchmarks/meta_probe.py [--out-dir outputs/default] [--seed 0] [--steps 760]
                                    [--out benchmarks/results/meta_probe.json]

Explained variance (EV) of the rows, 1 - sum ||W_i - W_hat_i||^2 / sum ||W_i - mean W||^2, for
meta SAEs trained from scratch on fixed decoder rows with the profile's meta settings
(n_meta_steps per macro-step, same optimiser, lr, AuxK), as many meta steps as the joint
run had, unless changed:

* ``as trained``: the joint run's own meta SAE on its final rows (eval.json's value);
* ``post hoc, same settings``: a fresh meta SAE on the final joint rows, and on the solo's rows;
* ``null: random unit rows``: the same on n random unit vectors in d dimensions, i.e. rows
  with no shared structure at all: what a meta SAE of this size explains by chance;
* ``post hoc, 4x steps``: schedule (does it just need longer?);
* ``post hoc, k x 4`` and ``m x 4``: meta sparsity and meta dictionary size;
* ``solo rows, overcomplete n/d``: the solo's rows are n = 4d; the paper's are 16d.

Prints one JSON object (and writes it with --out).  CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from probe_io import finish  # noqa: E402


def ev(W, W_hat) -> float:
    return float(1 - (W - W_hat).pow(2).sum() / (W - W.mean(0)).pow(2).sum())


def fit_meta(W, cfg, steps: int, seed: int = 0) -> float:
    import torch

    from metasae.sae import BatchTopKSAE, meta_reconstruction
    from metasae.trainer import _adam

    meta = BatchTopKSAE(cfg, seed=seed)
    opt = _adam(meta.parameters(), cfg)
    for _ in range(steps):
        out = meta.forward_train(W, True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        meta.remove_parallel_grad()
        opt.step()
        meta.normalize_decoder()
    with torch.no_grad():
        return ev(W, meta_reconstruction(meta, W, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out-dir", default="outputs/default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=0, help="meta steps (default: as many as the joint run had)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from metasae import pipeline
    from metasae.trainer import meta_sae_config

    ctx = pipeline.open_run(args.profile, args.out_dir)
    trained = pipeline.train_seed(ctx, args.seed, progress=False)
    joint = ctx.profile.replicated_run
    tj, ts = trained[joint], trained["solo"]
    p = ctx.profile
    n_steps = int(tj.history[-1]["step"])
    steps = args.steps or n_steps // p.meta.n_primary_steps * p.meta.n_meta_steps
    cfg = meta_sae_config(p.sae, p.meta)
    Wj = tj.sae.W_dec_FD.detach().float()
    Ws = ts.sae.W_dec_FD.detach().float()
    g = torch.Generator().manual_seed(0)
    R = torch.randn(Wj.shape, generator=g)
    R /= R.norm(dim=1, keepdim=True)
    t0 = time.time()
    res = {
        "run": joint, "seed": args.seed, "n": Wj.shape[0], "d": Wj.shape[1], "m": cfg.n_latents, "meta_k": cfg.k,
        "meta_steps": steps,
        "as_trained_joint": pipeline.meta_fit(tj.meta, tj.sae)["meta_explained_variance"],
        "post_hoc_joint_rows": fit_meta(Wj, cfg, steps),
        "post_hoc_solo_rows": fit_meta(Ws, cfg, steps),
        "null_random_unit_rows": fit_meta(R, cfg, steps),
        "post_hoc_solo_rows_4x_steps": fit_meta(Ws, cfg, 4 * steps),
        "post_hoc_solo_rows_k_x4": fit_meta(Ws, dataclasses.replace(cfg, k=4 * cfg.k), steps),
        "null_random_k_x4": fit_meta(R, dataclasses.replace(cfg, k=4 * cfg.k), steps),
        "post_hoc_solo_rows_m_x4": fit_meta(Ws, dataclasses.replace(cfg, n_latents=4 * cfg.n_latents,
                                                                    aux_k=min(cfg.aux_k, 4 * cfg.n_latents)), steps),
        "mean_abs_cos_solo_rows": float((Ws @ Ws.t()).fill_diagonal_(0).abs().mean()),
        "mean_abs_cos_random_rows": float((R @ R.t()).fill_diagonal_(0).abs().mean()),
    }
    finish(res, t0, args.out)


if __name__ == "__main__":
    main()
