"""Explanations one at a time against several in one left-padded batch.

    python benchmarks/explain_batch.py [--profile default] [--n-latents 8] [--batches 1,8] \
        [--out benchmarks/results/explain_batch.json]

Tokenises the profile's corpus into rows with the subject model's tokenizer (no
activations needed), builds the judge validation set's synthetic latents from them
(real corpus excerpts, the explanation set of a real latent: 15 top examples plus 3 per
lower quintile), and explains the same latents with the profile's explainer through
:func:`metasae.autointerp.explain.explain_latents`, in batches of each given size (no
request cache: every prompt is really run).  Prints per batch size the seconds, seconds
per explanation, the prompts' mean length in tokens, the explanations, how many equal
those of batch size 1 (left padding changes the bf16 arithmetic, so a greedy answer may
differ), and the load average.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="default")
    p.add_argument("--n-latents", type=int, default=8)
    p.add_argument("--batches", default="1,8", help="batch sizes to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from metasae.activations.corpus import load_documents, tokenize_rows, valid_mask
    from metasae.activations.models import load_model
    from metasae.autointerp.explain import explain_latents, explainer_messages, prompt_settings
    from metasae.autointerp.llm import HFLocalClient
    from metasae.autointerp.validation import build_validation_contexts
    from metasae.config import load_profile

    t0 = time.time()
    prof = load_profile(a.profile)
    cfg = prof.autointerp
    tok = load_model(prof.model.name, dtype="bfloat16").tokenizer
    n_rows = -(-prof.data.autointerp_tokens // prof.data.ctx_len)
    rows = tokenize_rows(load_documents(prof.data.corpus), tok, prof.data.ctx_len, n_rows)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ctxs = list(build_validation_contexts(rows.numpy(), valid_mask(rows, bos).numpy(), cfg, 0, tok,
                                          n_latents=a.n_latents).values())
    client = HFLocalClient(cfg.model)
    lengths = [len(client.tokenizer(client._prompt(explainer_messages(c.explain, *prompt_settings(cfg))),
                                    add_special_tokens=False)["input_ids"]) for c in ctxs]
    res = {"profile": a.profile, "explainer": cfg.model, "n_latents": len(ctxs), "threads": a.threads,
           "prompt_tokens_mean": sum(lengths) / len(lengths), "max_new_tokens": cfg.max_new_tokens,
           "explain_token_counts": cfg.explain_token_counts, "batches": {}}
    client.generate_batch([explainer_messages(ctxs[0].explain)[:1] + [{"role": "user", "content": "Hi"}]], 2)  # warm-up
    first = None
    for b in (int(x) for x in a.batches.split(",")):
        t1 = time.perf_counter()
        expl = []
        for i in range(0, len(ctxs), b):
            expl += [str(e) if e is not None else None for e in explain_latents(client, ctxs[i:i + b], cfg)]
        dt = time.perf_counter() - t1
        first = first or expl
        res["batches"][str(b)] = {"seconds": dt, "seconds_per_explanation": dt / len(ctxs),
                                  "same_as_first": sum(x == y for x, y in zip(expl, first)),
                                  "explanations": expl}
    base = res["batches"][a.batches.split(",")[0]]["seconds"]
    for v in res["batches"].values():
        v["speedup_vs_first"] = base / v["seconds"]
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
