"""Where one seed's autointerp time goes, on this CPU: the pipeline's own call, run again.

    python benchmarks/autointerp_seed.py --run outputs/default [--seed 1] [--threads 1] [--int8] \
        [--out benchmarks/results/autointerp_seed.json]

Runs ``pipeline.autointerp_seed`` (the matched pairs of the default's ``03_autointerp``, as
``bash run_all.sh`` runs them: one torch thread under ``--jobs 2``) on a scratch copy of a
finished run: the run's files are hard-linked into a temporary folder (nothing of the run is
written), without that seed's autointerp records and without the run's request cache, so that
every explanation and every judge prompt is really generated.  Prints the seconds with where
they went (``explain_s``: the explainer's batches, ``score_s``: every scorer, ``other_s``: the
contexts and loading the models), the requests, the prompt tokens per kind of request
(explanations, one-token judge answers: counted on the prompts as sent, shared prefixes
included), and the load average.  Compare with the run's own record of that seed
(``<run>/seed<N>/autointerp/summary.json``) only on the same kind of CPU.  ``--int8`` runs
the explainer's and judge's linear layers in int8 (``autointerp.local_int8``), ``--int8-keep``
names those kept in bf16 (``autointerp.int8_keep``, e.g. ``down_proj``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402


def linked_copy(run: Path, dest: Path, seed: int) -> None:
    """``run`` hard-linked into ``dest``, less ``seed<seed>/autointerp`` and ``llm_cache``
    (a file replaced there is a new file: the run's own copy is never touched)."""
    skip = {run / f"seed{seed}" / "autointerp", run / "llm_cache"}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(folder) / n in skip]

    shutil.copytree(run, dest, copy_function=os.link, ignore=ignore)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run's output folder (bash run_all.sh --out)")
    p.add_argument("--profile", default="default")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (run_all.sh: 1 per process)")
    p.add_argument("--int8", action="store_true", help="autointerp.local_int8: linear layers in int8")
    p.add_argument("--int8-keep", default=None,
                   help="with --int8: comma-separated layers kept in bf16 (autointerp.int8_keep; default: the profile's)")
    p.add_argument("--out", default="")
    a = p.parse_args()
    run = Path(a.run)
    if not (run / f"seed{a.seed}" / "autointerp" / "summary.json").is_file():
        sys.exit(f"{run} has no finished autointerp of seed {a.seed}: run bash run_all.sh first")

    import torch

    from metasae import pipeline
    from metasae.autointerp import llm

    tokens: collections.Counter = collections.Counter()
    chunk = llm.HFLocalClient._generate_chunk

    def counted(self, batch, max_new_tokens, *args, **kwargs):
        kind = "explanations" if max_new_tokens > 1 else "judge_answers"
        tokens[f"{kind}_prompts"] += len(batch)
        tokens[f"{kind}_prompt_tokens"] += sum(
            len(self.tokenizer(self._prompt(m), add_special_tokens=False)["input_ids"]) for m in batch)
        return chunk(self, batch, max_new_tokens, *args, **kwargs)

    llm.HFLocalClient._generate_chunk = counted
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        linked_copy(run, out, a.seed)
        ctx = pipeline.open_run(a.profile, out, Path(tmp) / "figures")
        if a.int8:
            keep = ctx.profile.autointerp.int8_keep if a.int8_keep is None else [x for x in a.int8_keep.split(",") if x]
            ctx.profile.autointerp = dataclasses.replace(ctx.profile.autointerp, local_int8=True, int8_keep=keep)
        torch.set_num_threads(a.threads)
        before = (run / f"seed{a.seed}" / "autointerp" / "summary.json").read_text()
        res = pipeline.autointerp_seed(ctx, a.seed, progress=False)
    recorded = json.loads(before).get("speed", {})
    finish({"run": str(run), "profile": a.profile, "seed": a.seed, "threads": a.threads, "int8": a.int8, "int8_keep": a.int8_keep,
            "judge": res["judge"], "n_pairs_scored": res["n_pairs_scored"],
            "n_pairs_embedding_only": res["n_pairs_embedding_only"], "speed": res["speed"],
            "prompts": dict(tokens), "n_failed": res["n_failed"],
            "recorded_in_run": {k: recorded.get(k) for k in ("seconds", "n_requests", "loadavg")}}, t0, a.out)


if __name__ == "__main__":
    main()
