"""How much of the seed-to-seed spread of Delta mean|phi| % is token-sampling noise, and how the
estimate moves with the number of phi tokens.

    python benchmarks/phi_noise.py --run outputs/default [--seeds 0,1,2,3,4] [--parts 4] \
        [--out benchmarks/results/phi_noise.json]

For every seed, the solo SAE and the headline joint (``selection.json``: ``replicated``, else
``selected``) are run once over the phi split with their stored EER thresholds, and their
co-firing counts are kept separately for ``--parts`` contiguous blocks of its rows.  Counts add
exactly, so the union of the blocks gives the run's own mean |phi| (checked against
``eval.json``).  From the blocks:

* the **token noise** of the full-split Delta % per seed, from the spread of the blocks' Delta %
  (the within-seed variance over ``parts`` blocks / ``parts``) and from the two halves
  ((d_A - d_B)^2 / 4), against the **between-seed** variance of the full-split Delta %; the MDE
  (paired t, alpha 0.05, power 0.8) with that noise halved (twice the phi tokens) and removed;
* Delta % on one block, on half the split and on all of it: mean |phi| over all alive pairs has a
  positive floor from sampling (independent latents have |phi| > 0 on a finite sample), which
  shrinks with N, so Delta % is measured against a baseline that contains it;
  ``sampling_floor_frac_of_mean`` estimates that floor at the full split, as a fraction of mean
  |phi|, from how mean |phi| grows on fewer tokens (assuming it falls as 1 / sqrt(N)).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _merged(parts):
    from metasae.metrics.cooccurrence import CoFiringCounts

    out = CoFiringCounts(parts[0].n)
    for c in parts:
        out.N11_packed += c.N11_packed
        out.N_i += c.N_i
        out.N += c.N
    return out


def block_counts(sae, thr, cache, batch: int, edges: list[int]):
    """Co-firing counts of ``sae`` on the phi split, one per block of valid tokens [edges[b], edges[b+1])."""
    import torch

    from metasae.metrics.cooccurrence import CoFiringCounts, resolve_thresholds

    theta = resolve_thresholds(sae, thr)
    blocks = [CoFiringCounts(sae.cfg.n_latents) for _ in range(len(edges) - 1)]
    pos = 0
    with torch.no_grad():
        for x in cache.valid_acts("phi", batch):
            fired = sae.pre_acts(x.float()) > theta
            s = 0
            while s < fired.shape[0]:  # a batch may straddle a block edge
                b = max(i for i in range(len(blocks)) if edges[i] <= pos + s)
                e = min(fired.shape[0], edges[b + 1] - pos)
                blocks[b].update_fired(fired[s:e], dense=False)
                s = e
            pos += fired.shape[0]
    if pos != edges[-1]:
        raise SystemExit(f"phi_noise: read {pos} phi tokens, expected {edges[-1]}")
    return blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run's output folder (bash run_all.sh --out)")
    p.add_argument("--profile", default="default")
    p.add_argument("--seeds", default="", help="comma-separated (default: the profile's seeds, each evaluated)")
    p.add_argument("--parts", type=int, default=4, help="contiguous blocks of the phi split (even, >= 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.parts < 2 or a.parts % 2:
        sys.exit("phi_noise: --parts must be an even number of at least 2")

    import torch

    from metasae import pipeline
    from metasae.checkpoint import load_trained_run
    from metasae.metrics.cooccurrence import phi_summary
    from metasae.summary import headline_name, mde_from_sd

    t0 = time.time()
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    joint = headline_name(run)
    if joint is None:
        sys.exit(f"phi_noise: {run / 'selection.json'} names no joint configuration: run 02_cooccurrence first")
    ctx = pipeline.open_run(a.profile, a.run, "")
    cache = pipeline.ensure_activations(ctx, progress=False)
    batch = ctx.profile.train.batch_size
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else list(ctx.profile.seeds)
    evals = {}
    for s in seeds:
        path = pipeline.metrics_dir(ctx, s) / "eval.json"
        ev = json.loads(path.read_text()) if path.is_file() else {}
        if not all(nm in ev and "mean_abs_phi" in ev[nm] for nm in ("solo", joint)):
            sys.exit(f"phi_noise: {path} lacks mean_abs_phi of solo or {joint}: evaluate seed {s} first")
        evals[s] = ev

    mask = np.asarray(cache.mask("phi")).astype(bool)
    row_valid = mask.reshape(mask.shape[0], -1).sum(1)
    edges = [int(row_valid[:round(b * mask.shape[0] / a.parts)].sum()) for b in range(a.parts + 1)]
    half = a.parts // 2
    res = {"run": str(run), "joint": joint, "seeds": seeds, "parts": a.parts, "threads": a.threads,
           "phi_tokens": edges[-1], "block_token_edges": edges, "per_seed": {}}
    for s in seeds:
        row = {}
        for nm in ("solo", joint):
            trained = load_trained_run(pipeline.ckpt_root(ctx, s), nm)
            thr = pipeline.thresholds_for(ctx, s, nm, trained, cache)  # the run's stored ones
            tp = time.time()
            blocks = block_counts(trained.sae, thr, cache, batch, edges)
            phis = {f"block{b}": phi_summary(c).mean_abs_phi for b, c in enumerate(blocks)}
            phis["half_a"] = phi_summary(_merged(blocks[:half])).mean_abs_phi
            phis["half_b"] = phi_summary(_merged(blocks[half:])).mean_abs_phi
            phis["full"] = phi_summary(_merged(blocks)).mean_abs_phi
            if not math.isclose(phis["full"], evals[s][nm]["mean_abs_phi"], rel_tol=1e-9):
                sys.exit(f"phi_noise: seed {s} {nm}: mean |phi| {phis['full']} here, "
                         f"{evals[s][nm]['mean_abs_phi']} in eval.json: not the run's own computation")
            row[nm] = {"mean_abs_phi": phis, "seconds": round(time.time() - tp, 1)}
            print(f"seed {s} {nm}: full {phis['full']:.6f}, halves {phis['half_a']:.6f} / {phis['half_b']:.6f} "
                  f"({row[nm]['seconds']} s)", flush=True)
        so, jo = row["solo"]["mean_abs_phi"], row[joint]["mean_abs_phi"]
        row["delta_pct"] = {k: 100.0 * (jo[k] / so[k] - 1.0) for k in so}
        res["per_seed"][str(s)] = row

    keys = res["per_seed"][str(seeds[0])]["delta_pct"]
    d = {k: np.array([res["per_seed"][str(s)]["delta_pct"][k] for s in seeds]) for k in keys}
    blocks = np.stack([d[f"block{b}"] for b in range(a.parts)], axis=1)
    n = len(seeds)
    between = float(np.var(d["full"], ddof=1)) if n > 1 else float("nan")
    noise_blocks = float(np.mean(np.var(blocks, axis=1, ddof=1)) / a.parts)
    noise_halves = float(np.mean((d["half_a"] - d["half_b"]) ** 2) / 4)
    noise = max(noise_blocks, noise_halves)
    res["variance_pct2"] = {
        "between_seeds": between, "token_noise_from_blocks": noise_blocks, "token_noise_from_halves": noise_halves,
        "noise_fraction": noise / between if between > 0 else None}
    if n > 1:
        res["mde_pct"] = {"as_run": mde_from_sd(math.sqrt(between), n),
                          "twice_the_phi_tokens": mde_from_sd(math.sqrt(max(between - noise / 2, 0.0)), n),
                          "no_token_noise": mde_from_sd(math.sqrt(max(between - noise, 0.0)), n)}
    # the sampling floor at the full split, if it falls as 1/sqrt(N): m(N/2) - m(N) = F (sqrt 2 - 1),
    # m(N/parts) - m(N) = F (sqrt(parts) - 1); as a fraction of m(N), over every SAE measured
    fl_h, fl_b = [], []
    for s in seeds:
        for nm in ("solo", joint):
            m = res["per_seed"][str(s)][nm]["mean_abs_phi"]
            fl_h.append(((m["half_a"] + m["half_b"]) / 2 - m["full"]) / (math.sqrt(2) - 1) / m["full"])
            fl_b.append((np.mean([m[f"block{b}"] for b in range(a.parts)]) - m["full"])
                        / (math.sqrt(a.parts) - 1) / m["full"])
    res["sampling_floor_frac_of_mean"] = {"from_halves": float(np.mean(fl_h)), "from_blocks": float(np.mean(fl_b))}
    res["delta_pct_mean_by_tokens"] = {
        f"{edges[-1] // a.parts} (one block)": float(blocks.mean()),
        f"{edges[-1] // 2} (half)": float(((d["half_a"] + d["half_b"]) / 2).mean()),
        f"{edges[-1]} (all)": float(d["full"].mean())}
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
