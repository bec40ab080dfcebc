"""How fast does the local judge answer its one-token questions?  Three ways, on a run's real prompts.

    python benchmarks/judge_prefix.py --llm-cache outputs/default/llm_cache \
        [--n-explanations 8] [--threads 2] [--out benchmarks/results/judge_prefix.json]

Reads the judge requests a run left in its request cache (``<out>/llm_cache``; nothing is
written there), keeps the explanations whose fuzz, detection and simulation batches are all
there (10 prompts each), and answers each explanation's three batches, in the pipeline's
order, with the same model three ways, round-robin per explanation:

* ``before``: the shared prefix (system prompt and explanation) encoded once per batch in one
  piece, and the output layer over every tail position;
* ``last_logits``: the same, the output layer at each prompt's last position only;
* ``remembered``: also each scorer's system prompt encoded once and remembered
  (``HFLocalClient.prefix_caches``), each batch encoding only its explanation and tails.

Prints the seconds of each, the speed-ups over ``before``, and the largest difference of a
reported first-token log-probability from ``before`` (the bf16 arithmetic of a prefix
encoded in two pieces differs from one piece; the answers of one way do not depend on the
batches before them, tests/test_judge_validation.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_io import finish  # noqa: E402

WAYS = {"before": (False, 0), "last_logits": (True, 0), "remembered": (True, 8)}
"""way -> (HFLocalClient.last_logits_only, HFLocalClient.prefix_caches)"""


def explanation_batches(folder: Path, n: int, size: int = 10) -> list[list[list[dict]]]:
    """Per explanation, its batches (one per scorer's system prompt) of one-token judge requests."""
    by_expl: dict[str, dict[str, list]] = collections.defaultdict(dict)
    for f in sorted(folder.glob("*/*.json")):
        d = json.loads(f.read_text())
        if d.get("params", {}).get("max_new_tokens") != 1:
            continue
        m = d["messages"]
        by_expl[m[1]["content"].split("\n\n")[0]].setdefault(m[0]["content"], []).append(m)
    full = [[v[:size] for _, v in sorted(g.items())] for _, g in sorted(by_expl.items())
            if len(g) == 3 and all(len(v) >= size for v in g.values())]
    if not full:
        raise SystemExit(f"{folder} holds no explanation with three scorers' batches of {size} judge prompts; "
                         "point --llm-cache at the request cache of a run whose autointerp finished")
    return full[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm-cache", required=True, help="a run's request cache folder (<out>/llm_cache)")
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--n-explanations", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args()
    folder = Path(a.llm_cache)
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a folder; pass a run's request cache (<out>/llm_cache)")

    import torch

    torch.set_num_threads(a.threads)
    from metasae.autointerp.llm import HFLocalClient

    t0 = time.time()
    seqs = explanation_batches(folder, a.n_explanations)
    client = HFLocalClient(a.model)
    client._first_token_chunk(seqs[0][0])  # warm-up, untimed
    seconds = dict.fromkeys(WAYS, 0.0)
    memory: dict[str, dict] = {w: {} for w in WAYS}
    diff = dict.fromkeys(WAYS, 0.0)
    n_prompts = 0
    for seq in seqs:
        answers = {}
        for way, (last, caches) in WAYS.items():
            client.last_logits_only, client.prefix_caches, client._prefixes = last, caches, memory[way]
            outs = []
            for batch in seq:
                t = time.perf_counter()
                outs.append(client._first_token_chunk(batch))
                seconds[way] += time.perf_counter() - t
            answers[way] = [c for o in outs for c in o]
        n_prompts += len(answers["before"])
        for way in WAYS:
            for x, y in zip(answers[way], answers["before"]):
                common = set(x.first_token_logprobs) & set(y.first_token_logprobs)
                diff[way] = max(diff[way], max(abs(x.first_token_logprobs[k] - y.first_token_logprobs[k])
                                               for k in common))
    res = {"judge": a.model, "threads": a.threads, "n_explanations": len(seqs), "n_prompts_per_way": n_prompts,
           "seconds_by_way": seconds, "speedup_vs_before": {w: seconds["before"] / s for w, s in seconds.items()},
           "max_abs_logprob_diff_vs_before": diff, "loadavg_start": os.getloadavg()}
    res["seconds_per_prompt"] = {w: s / n_prompts for w, s in seconds.items()}
    finish(res, t0, a.out)


if __name__ == "__main__":
    main()
