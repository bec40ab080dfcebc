"""Another judge on a finished run's own explanations: is it as good, and how much faster?

    python benchmarks/judge_compare.py --run outputs/default --judge qwen2.5-coder-0.5b \
        [--seed 0] [--threads 1] [--out benchmarks/results/judge_compare.json]

Takes the run's autointerp pairs of ``--seed`` (the same joint and solo latents, the same
explanations, the same examples and random explanations: everything but the judge) and
scores them again with ``--judge`` through ``autointerp.judge_model`` (the explanations come
from the run's records, so the explainer never runs), then scores the judge validation set
with it.  Prints, for the run's judge and for ``--judge`` side by side: the validation AUC of
correct vs random explanations per score, real minus random on the solo latents with its 95%
CI, the joint-vs-solo deltas, the seconds each judge took (the run's from its summaries, taken
inside the run beside other work; ``--judge``'s here, on ``--threads``), and the load average.
The request cache is a temporary folder: every prompt is really run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402


class _RecordedExplanations:
    """The explainer's place in ``score_latents`` when every explanation is already recorded:
    named as the run's explainer, it is never asked (a request would be a missing explanation)."""

    backend_id = "hf-local"

    def __init__(self, model_id: str):
        self.model_id = model_id

    def generate_batch(self, batch, *args, **kwargs):
        from metasae.autointerp.llm import LLMFailure

        return [LLMFailure("judge_compare: this latent's explanation is not recorded in the run") for _ in batch]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run's output folder (bash run_all.sh --out)")
    p.add_argument("--judge", required=True, help="the judge to compare (a packaged judge, registry key or folder)")
    p.add_argument("--profile", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-validation", action="store_true", help="skip the judge validation set")
    p.add_argument("--out", default="")
    a = p.parse_args()

    import torch

    from metasae import pipeline
    from metasae.autointerp.llm import make_client
    from metasae.autointerp.run import record_path, score_latents, summarize_pairs, summarize_vs_random
    from metasae.autointerp.validation import build_validation_contexts, score_validation, summarize_validation

    t0 = time.time()
    torch.set_num_threads(a.threads)
    ctx = pipeline.open_run(a.profile, a.run, "")
    run_dir = Path(a.run)
    adir = run_dir / f"seed{a.seed}" / "autointerp"
    if not (adir / "summary.json").is_file():
        sys.exit(f"judge_compare: {adir / 'summary.json'} does not exist: run 03_autointerp for seed {a.seed} first")
    old = json.loads((adir / "summary.json").read_text())
    cfg = dataclasses.replace(ctx.profile.autointerp, judge_model=a.judge)
    joint, n = old["joint"], int(old["n_pairs_scored"])
    lj = [int(q["joint"]) for q in old["pairs"]]
    ls = [int(q["solo"]) for q in old["pairs"]]
    cache = pipeline.ensure_activations(ctx, progress=False)
    tokenizer = pipeline.loaded_model(ctx).tokenizer
    ctx_j = pipeline._contexts_for(ctx, a.seed, joint, lj, cache, tokenizer)
    ctx_s = pipeline._contexts_for(ctx, a.seed, "solo", ls, cache, tokenizer)
    res = {"run": str(run_dir), "seed": a.seed, "threads": a.threads, "explainer": cfg.model,
           "run_judge": old.get("judge"), "judge": a.judge, "n_pairs": n, "n_pairs_embedding_only": len(lj) - n}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "autointerp"
        originals = {}
        for name, lats in ((joint, lj), ("solo", ls)):
            for i in lats:
                src, dst = record_path(adir, name, i), record_path(out, name, i)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                originals[(name, i)] = json.loads(src.read_text())
        judge = make_client(cfg, cache_dir=Path(tmp) / "llm_cache", role="judge")
        explainer = _RecordedExplanations(cfg.model)
        t1 = time.time()
        rec_j = score_latents(joint, lj, ctx_j, explainer, cfg, out, seed=a.seed, progress=True,
                              random_baseline=cfg.random_baseline_joint, embedding_only=lj[n:], judge=judge)
        rec_s = score_latents("solo", ls, ctx_s, explainer, cfg, out, seed=a.seed, progress=True,
                              embedding_only=ls[n:], judge=judge)
        pairs_s, pairs_prompts = time.time() - t1, judge.misses  # an empty cache: every request is sent
        old_j = [originals[(joint, i)] for i in lj]
        old_s = [originals[("solo", i)] for i in ls]
        same_random = sum(r["random_explanation"] == o["random_explanation"] for r, o in zip(rec_s, old_s))
        res["pairs"] = {
            "run_judge": {"vs_random_solo": summarize_vs_random(old_s), "joint_vs_solo": summarize_pairs(old_j, old_s),
                          "seconds_in_run": (old.get("speed") or {}).get("seconds"),
                          "loadavg_in_run": (old.get("speed") or {}).get("loadavg")},
            "judge": {"vs_random_solo": summarize_vs_random(rec_s), "joint_vs_solo": summarize_pairs(rec_j, rec_s),
                      "seconds": pairs_s, "n_prompts": pairs_prompts},
            "same_random_explanations": f"{same_random} of {len(ls)}",
        }
        if not a.no_validation:
            vctx = build_validation_contexts(cache.tokens("autointerp").numpy(), cache.mask("autointerp").numpy(),
                                             cfg, 0, tokenizer, n_latents=cfg.n_validation_latents)
            t2, p0 = time.time(), judge.misses
            vrec = score_validation(vctx, judge, cfg, Path(tmp) / "validation", seed=0, progress=True)
            vpath = run_dir / "autointerp" / "validation_summary.json"
            vold = json.loads(vpath.read_text()) if vpath.is_file() else {}
            res["validation"] = {
                "run_judge": {"summary": vold.get("summary"), "speed_in_run": vold.get("speed")},
                "judge": {"summary": summarize_validation(vrec), "seconds": time.time() - t2,
                          "n_prompts": judge.misses - p0},
            }
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
