"""How good and how fast is an offline judge?  The judge validation set, measured.

    python benchmarks/judge_validation.py --cache outputs/default/activations \
        --model qwen2.5-coder-1.5b [--n-latents 8] [--window 16] [--int8] [--threads 1] \
        [--out benchmarks/results/judge_qwen15.json]

Builds the validation set (synthetic latents with known answers) from the cache's
autointerp split with the default profile's autointerp settings, scores it with
every scorer through the named hf-local judge (no request cache: every prompt is
really run), and prints the AUC of correct vs random and vs wrong explanations per
score, the seconds it took, the judge's prompt throughput and the load average.
``--int8`` runs the judge's linear layers in int8 (``autointerp.local_int8``); ``--int8-keep``
names layers (ends of module names, e.g. ``down_proj``) kept in bf16 besides the output layer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="a run's activations folder (holds the autointerp split)")
    p.add_argument("--profile", default="default")
    p.add_argument("--model", default="", help="judge (default: the profile's)")
    p.add_argument("--n-latents", type=int, default=0, help="synthetic latents (default: the profile's)")
    p.add_argument("--window", type=int, default=0, help="tokens per example window (default: the profile's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--int8", action="store_true", help="the judge's linear layers in int8 (autointerp.local_int8)")
    p.add_argument("--int8-keep", default="", help="with --int8: comma-separated layers kept in bf16 (e.g. down_proj)")
    p.add_argument("--out", default="")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from metasae.activations.cache import open_cache
    from metasae.activations.models import load_model
    from metasae.autointerp.llm import HFLocalClient
    from metasae.autointerp.validation import build_validation_contexts, score_validation, summarize_validation
    from metasae.config import load_profile

    prof = load_profile(a.profile)
    cfg = prof.autointerp
    if a.window:
        import dataclasses

        cfg = dataclasses.replace(cfg, window=a.window)
    model = a.model or cfg.model
    n_lat = a.n_latents or cfg.n_validation_latents
    cache = open_cache(Path(a.cache), prof.name)
    tok = load_model(prof.model.name, dtype="bfloat16").tokenizer
    t0 = time.time()
    ctxs = build_validation_contexts(cache.tokens("autointerp").numpy(), cache.mask("autointerp").numpy(), cfg, 0,
                                     tok, n_latents=n_lat)
    keep = tuple(x for x in a.int8_keep.split(",") if x)
    client = HFLocalClient(model, int8=a.int8, int8_keep=keep if a.int8 else ())
    n_prompts, n_tokens = 0, 0
    inner = client.generate_batch

    def counting(batch, *args, **kw):
        nonlocal n_prompts, n_tokens
        n_prompts += len(batch)
        n_tokens += sum(len(client.tokenizer(client._prompt(m), add_special_tokens=False)["input_ids"]) for m in batch)
        return inner(batch, *args, **kw)

    client.generate_batch = counting  # type: ignore[method-assign]
    t1 = time.time()
    with tempfile.TemporaryDirectory() as d:
        recs = score_validation(ctxs, client, cfg, d, progress=False)
    t_score = time.time() - t1
    # the shared-prefix path against encoding every prompt whole, on one latent's detection
    # prompts (the same requests, timed back to back)
    from metasae.autointerp.scorers import detection_items, detection_messages

    first = next(iter(ctxs.values()))
    batch = [detection_messages("Numbers written with digits.", t) for t, _ in detection_items(first)]
    timing = {}
    for share in (True, False):
        client.share_prefix = share
        t2 = time.perf_counter()
        inner(batch, 1, 0.0, True)
        timing["shared" if share else "whole"] = time.perf_counter() - t2
    client.share_prefix = True
    res = {"judge": client.model_id, "int8": a.int8, "int8_keep": list(keep), "window": cfg.window, "shared_prefix_speedup": timing["whole"] / timing["shared"], "prefix_timing_s": timing, "profile": prof.name, "latents": list(ctxs), "n_prompts": n_prompts,
           "prompt_tokens": n_tokens, "score_seconds": t_score, "prompts_per_s": n_prompts / t_score,
           "prompt_tokens_per_s": n_tokens / t_score, "threads": a.threads,
           "summary": summarize_validation(recs), "n_failed": sum(r["n_failed"] for r in recs),
           "loadavg_start": os.getloadavg()}
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
