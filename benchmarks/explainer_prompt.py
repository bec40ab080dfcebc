"""Does listing the marked tokens make the explainer's explanations informative?

    python benchmarks/explainer_prompt.py --run outputs/default [--seed 0] [--n-latents 20] \
        [--counts 0,10] [--contexts 0] [--examples 15/3,10/2] [--out benchmarks/results/explainer_prompt.json]

On a finished run's solo SAE, draws latents that fire often enough on the autointerp
split to fill every context set (as ``pipeline.autointerp_seed`` does), explains each
once per value of ``autointerp.explain_token_counts`` (0 = the paper's prompt alone) and of
``autointerp.explain_context`` (tokens of each example shown; 0 = the whole window) with
the profile's explainer, and scores every explanation, and a random one drawn as the run
does, with the embedding scorer and the judge's detection scorer.  Prints per prompt the
mean of (real - random) with its 95% t CI per score, the explanations, the seconds and
the load average.  The request cache is a temporary folder: every prompt is really run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402


def fewer_examples(c, top: int, lower: int, seed: int):
    """``c`` (LatentContexts) with a random ``top`` of its top-quintile explanation examples and
    ``lower`` of each lower quintile's (the pipeline's draw with n_explain_top = top and
    n_explain_per_lower = lower, but that the other sets stay as they are), strongest first."""
    import numpy as np

    rng = np.random.default_rng([seed, c.latent, 7])
    keep = []
    for q in sorted({e.quintile for e in c.explain}):
        exs = [e for e in c.explain if e.quintile == q]
        n = top if q == 0 else lower
        keep += [exs[i] for i in sorted(rng.permutation(len(exs))[:n])]
    return dataclasses.replace(c, explain=sorted(keep, key=lambda e: -e.activation))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run's output folder (bash run_all.sh --out)")
    p.add_argument("--profile", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-latents", type=int, default=20)
    p.add_argument("--counts", default="0,10", help="values of explain_token_counts to compare")
    p.add_argument("--contexts", default="0", help="values of explain_context to compare (0: the whole window)")
    p.add_argument("--examples", default="",
                   help="explanation examples shown, as TOP/LOWER pairs (e.g. 15/3,10/2): n_explain_top and "
                        "n_explain_per_lower, each a random subset of the profile's draw (default: the profile's)")
    p.add_argument("--scorers", default="embedding,detection")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args()

    import numpy as np
    import torch

    from metasae import pipeline
    from metasae.autointerp.contexts import build_all_contexts, collect_firings, requirement
    from metasae.autointerp.llm import make_client
    from metasae.autointerp.run import score_latents, summarize_vs_random

    t0 = time.time()
    ctx = pipeline.open_run(a.profile, a.run, "")
    torch.set_num_threads(a.threads)
    cache = pipeline.ensure_activations(ctx, progress=False)
    run = pipeline.train_seed(ctx, a.seed, progress=False)["solo"]
    thr = pipeline.thresholds_for(ctx, a.seed, "solo", run, cache)
    acts, tokens, mask = cache.split_arrays("autointerp")
    cfg0 = ctx.profile.autointerp
    firings = collect_firings(run.sae, thr.thresholds_F, acts, mask)
    need = 1.25 * 5 * max(requirement(cfg0))
    counts = np.array([firings.count(i) for i in range(run.sae.cfg.n_latents)])
    eligible = np.nonzero(counts >= need)[0]
    latents = sorted(int(i) for i in np.random.default_rng([a.seed, 23]).choice(
        eligible, size=min(a.n_latents, len(eligible)), replace=False))
    contexts = build_all_contexts(latents, firings, tokens, cfg0, a.seed, sae=run.sae, acts_RTD=acts,
                                  thresholds_F=thr.thresholds_F, mask_RT=mask,
                                  tokenizer=pipeline.loaded_model(ctx).tokenizer)
    res = {"run": str(a.run), "profile": a.profile, "seed": a.seed, "explainer": cfg0.model, "latents": latents,
           "n_eligible": int(len(eligible)), "threads": a.threads, "prompts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        client = make_client(cfg0, cache_dir=Path(tmp) / "llm_cache")
        contexts_shown = [int(x) for x in a.contexts.split(",")]
        shown = [tuple(int(v) for v in x.split("/")) for x in a.examples.split(",")] if a.examples else [None]
        for n, c, ex in itertools.product((int(x) for x in a.counts.split(",")), contexts_shown, shown):
            cfg = dataclasses.replace(cfg0, scorers=a.scorers.split(","), explain_token_counts=n, explain_context=c)
            key = (f"explain_token_counts={n}" + (f",explain_context={c}" if contexts_shown != [0] else "")
                   + (f",examples={ex[0]}/{ex[1]}" if ex else ""))
            ctxs = contexts if ex is None else {k: fewer_examples(v, *ex, a.seed) for k, v in contexts.items()}
            t1 = time.time()
            recs = score_latents("solo", latents, ctxs, client, cfg, Path(tmp) / f"prompt{len(res['prompts'])}",
                                 seed=a.seed, progress=False)
            res["prompts"][key] = {
                "seconds": time.time() - t1, "vs_random": summarize_vs_random(recs),
                "explanations": {r["latent"]: r["explanation"] for r in recs},
                "n_with_word_specific": sum(1 for r in recs if "specific" in (r["explanation"] or "").lower()),
            }
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
