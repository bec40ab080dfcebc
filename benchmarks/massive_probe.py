"""Massive activations: what leaving them out of training and passing them through at the splice changes.

    python benchmarks/massive_probe.py [--out-dir outputs/default] [--epochs 1] [--out benchmarks/results/massive_probe.json]

On a finished run's activation cache (default profile): two solo SAEs with the profile's
settings, same init and batch order, one trained on every token and one with the massive
tokens (norm > data.massive_norm_ratio x the median) left out.  For each: explained variance
(standardised space, global-threshold rule) on the phi split with and without the massive
tokens, mean |phi| (EER thresholds), and the CE loss score spliced on the profile's CE rows with
the massive tokens spliced and passed through.  Prints one JSON object (and writes it with --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from probe_io import finish  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out-dir", default="outputs/default")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("METASAE_THREADS", "2")))
    from metasae import pipeline
    from metasae.activations.harvest import ce_with_splices
    from metasae.config import RunSpec
    from metasae.metrics.cooccurrence import CoFiringCounts, phi_summary
    from metasae.metrics.recon import ce_summary, reconstruction_metrics
    from metasae.metrics.thresholds import calibrate_eer_thresholds
    from metasae.trainer import FanOutTrainer

    ctx = pipeline.open_run(args.profile, args.out_dir)
    p = ctx.profile
    cache = pipeline.ensure_activations(ctx, progress=False)
    B = p.train.batch_size
    cut = cache.massive_norm(p.data.massive_norm_ratio or 5.0)
    t0 = time.time()
    saes = {}
    for label, excl in (("trained_on_all_tokens", float("inf")), ("massive_left_out", cut)):
        n_steps = cache.num_batches("train", B, args.epochs, exclude_above=excl)
        tr = FanOutTrainer(p.sae, p.meta, dataclasses.replace(p.train, checkpoint_every_steps=10 ** 9),
                           [RunSpec("solo")], progress=False)
        st = tr.train(lambda s, e=excl: cache.iter_batches("train", B, seed=0, epochs=args.epochs, start_batch=s,
                                                         exclude_above=e), n_steps,
                      calib=lambda: cache.valid_acts("calib", B))[0]
        saes[label] = st.primary
    norms = torch.from_numpy(cache.token_norms("phi"))
    res: dict = {"cut_norm": cut, "massive_tokens_phi_split": int((norms > cut).sum()),
                 "phi_tokens": int(len(norms)), "epochs": args.epochs}
    lm = pipeline.loaded_model(ctx)
    tokens, mask = pipeline._ce_rows(ctx, cache)
    fns = {}
    for label, sae in saes.items():
        x0 = next(iter(cache.valid_acts("calib", B)))
        thr = calibrate_eer_thresholds(sae, cache.valid_acts("calib", B), batch_size=B,
                                       max_value=pipeline._eer_max_value(sae, x0))
        counts = CoFiringCounts(sae.cfg.n_latents)
        rec = reconstruction_metrics(sae, cache.valid_acts("phi", B), thresholds=thr, counts=counts)
        X = torch.cat(list(cache.valid_acts("phi", 65536)))
        keep = norms <= cut
        rec_nm = reconstruction_metrics(sae, X[keep].split(B), thresholds=thr)
        res[label] = {"explained_variance_std_all_tokens": rec["explained_variance_std"],
                      "explained_variance_std_without_massive": rec_nm["explained_variance_std"],
                      "explained_variance_raw_all_tokens": rec["explained_variance"],
                      "explained_variance_raw_without_massive": rec_nm["explained_variance"],
                      "mean_abs_phi": phi_summary(counts).mean_abs_phi, "dead": rec["dead"]}
        fns[f"{label}|spliced"] = pipeline.splice_fn(sae)
        fns[f"{label}|passthrough"] = pipeline.splice_fn(sae, cut)
    ce = ce_with_splices(lm, p.model.layer, tokens, mask, fns, batch_rows=p.data.harvest_batch_rows)
    for key, raw in ce.items():
        label, how = key.split("|")
        s = ce_summary(raw)
        res[label][f"ce_loss_score_massive_{how}"] = s["ce_loss_score"]
        res[label][f"delta_ce_pct_massive_{how}"] = s["delta_ce_pct"]
    finish(res, t0, args.out)


if __name__ == "__main__":
    main()
