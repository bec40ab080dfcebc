"""Scoring an explanation (SPEC 3.7).  Four scorers, each clearly named:

* ``fuzz`` (Paulo et al. 2024 / EleutherAI delphi, what the paper *describes*):
  activating examples with every token >= 0.3 x the example's max wrapped in
  << >>; non-activating examples with as many random tokens wrapped; the judge
  answers 1 (correctly labelled) or 0, one example per prompt; score = balanced
  accuracy, chance 0.5.
* ``simulation`` (what the paper's released code *computes*, the source of its
  0.248 vs 0.230): the judge predicts 0-10 activations of 25 held-out activating
  contexts; score = Spearman rho; constant predictions score 0, an unparsable
  answer is missing (None).
* ``detection``: activating and random non-activating passages; the judge says
  1/0 whether the explanation applies; balanced accuracy.

* ``embedding`` (delphi's): cosine similarity of sentence embeddings of the
  explanation and of activating / non-activating passages; ROC AUC, no LLM.

The parsers and metrics are pure functions.  A backend failure
(:class:`LLMFailure`) makes that scorer's score missing (``failed: True``);
it is never turned into a number.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from metasae.autointerp.contexts import Example, LatentContexts, example_text
from metasae.autointerp.llm import Completion, LLMFailure

HIGHLIGHT_FRAC = 0.3
BINARY_MAX_TOKENS = 1  # the answer is read from the first token's log-probabilities (text as fallback)
SIMULATION_MIN_TOKENS = 32


# ---------------------------------------------------------------------------
# Pure helpers: highlighting, parsing, metrics
# ---------------------------------------------------------------------------


def highlight_positions(acts: Sequence[float], frac: float = HIGHLIGHT_FRAC) -> list[int]:
    """Positions with activation >= frac x the example's max (only where the latent fires)."""
    a = np.asarray(acts, dtype=np.float64)
    if a.size == 0 or not np.any(a > 0):
        return []
    return [int(i) for i in np.nonzero((a >= frac * a.max()) & (a > 0))[0]]


def highlight(tokens: Sequence[str], positions: Sequence[int], newline: str = "\\n") -> str:
    """Join tokens, wrapping runs of highlighted positions in << >> (delphi's convention)."""
    marked = set(int(p) for p in positions)
    out: list[str] = []
    open_ = False
    for i, t in enumerate(tokens):
        t = t.replace("\n", newline)
        if i in marked and not open_:
            out.append("<<")
            open_ = True
        elif i not in marked and open_:
            out.append(">>")
            open_ = False
        out.append(t)
    if open_:
        out.append(">>")
    return "".join(out)


def _logsumexp(xs: list[float]) -> float:
    if not xs:
        return -math.inf
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs)) if m > -math.inf else -math.inf


_DIGIT = re.compile(r"(?<![\d.])([01])(?![\d.])")


def parse_binary(comp: Completion | str | None) -> int | None:
    """1/0 from the first token's log-probabilities (P("1") vs P("0")) when given, else from the text."""
    if comp is None:
        return None
    text, lps = (comp, None) if isinstance(comp, str) else (comp.text, comp.first_token_logprobs)
    if lps:
        by = {"1": [], "0": []}
        for tok, v in lps.items():
            k = tok.strip()
            if k in by and v is not None and not math.isnan(v):
                by[k].append(float(v))
        l1, l0 = _logsumexp(by["1"]), _logsumexp(by["0"])
        if l1 > -math.inf or l0 > -math.inf:
            return 1 if l1 > l0 else 0
    m = _DIGIT.search(text or "")
    if m:
        return int(m.group(1))
    low = (text or "").strip().lower()
    if low.startswith("yes"):
        return 1
    if low.startswith("no"):
        return 0
    return None


def binary_log_odds(comp: Completion | str | None) -> float | None:
    """log P("1") - log P("0") of the first answer token, when the backend gives log-probabilities."""
    if comp is None or isinstance(comp, str) or not comp.first_token_logprobs:
        return None
    by: dict[str, list[float]] = {"1": [], "0": []}
    for tok, v in comp.first_token_logprobs.items():
        k = tok.strip()
        if k in by and v is not None and not math.isnan(v):
            by[k].append(float(v))
    l1, l0 = _logsumexp(by["1"]), _logsumexp(by["0"])
    if l1 == -math.inf and l0 == -math.inf:
        return None
    return l1 - l0


def roc_auc(labels: Sequence[int], scores: Sequence[float | None]) -> float | None:
    """Area under the ROC curve of `scores` for `labels` (ties count one half); None if a class
    is absent or a score is missing.  Threshold-free, so a judge whose answers lean to one side
    (balanced accuracy stuck at 0.5) still shows whether it ranks real above wrong examples."""
    if any(x is None for x in scores):
        return None
    y = np.asarray(labels, dtype=int)
    x = np.asarray(scores, dtype=float)
    pos, neg = x[y == 1], x[y == 0]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def balanced_accuracy(labels: Sequence[int], preds: Sequence[int | None]) -> float | None:
    """Mean of the per-class recalls; an unparsed prediction (None) counts as wrong.

    None when a class is absent (the score is undefined)."""
    y = np.asarray(labels, dtype=int)
    if len(preds) != len(y):
        raise ValueError("labels and predictions differ in length")
    ok = np.array([p is not None and int(p) == int(t) for p, t in zip(preds, y)], dtype=bool)
    recalls = []
    for c in (0, 1):
        sel = y == c
        if not sel.any():
            return None
        recalls.append(ok[sel].mean())
    return float(np.mean(recalls))


_ARRAY = re.compile(r"\[[^\[\]]*\]")


def parse_simulation(text: str | None, n: int) -> list[float] | None:
    """The first JSON array of exactly ``n`` numbers in ``text``, else None (missing)."""
    if not text:
        return None
    for m in _ARRAY.finditer(text):
        try:
            arr = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if not isinstance(arr, list):
            continue
        vals: list[float] = []
        for v in arr:
            if isinstance(v, bool):
                return None
            if isinstance(v, (int, float)):
                vals.append(float(v))
            elif isinstance(v, str):
                try:
                    vals.append(float(v))
                except ValueError:
                    return None
            else:
                return None
        if not all(math.isfinite(v) for v in vals):
            return None
        return vals if len(vals) == n else None
    return None


def spearman_score(actual: Sequence[float], predicted: Sequence[float] | None) -> float | None:
    """Spearman rho; constant predictions (or actuals) score 0 as in the paper's code; None stays None."""
    if predicted is None:
        return None
    a, p = np.asarray(actual, dtype=float), np.asarray(predicted, dtype=float)
    if len(a) != len(p):
        return None
    if len(a) < 2 or np.all(p == p[0]) or np.all(a == a[0]):
        return 0.0
    from scipy.stats import spearmanr

    rho = float(spearmanr(a, p).statistic)
    return 0.0 if math.isnan(rho) else rho


def shuffled_explanation(text: str, rng: np.random.Generator) -> str:
    """The explanation's words in random order: a baseline the judge should not beat chance with."""
    words = text.split()
    return " ".join(words[j] for j in rng.permutation(len(words)))


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------

FUZZ_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a description of a "
    "feature of a language model and a text example. Portions of the example which strongly represent the "
    "feature are between tokens << and >>. Some examples might be mislabeled. Your task is to determine "
    "whether every single token within << and >> is correctly labeled, given the description. "
    "Answer 1 if the example is correctly labeled or 0 if the tokens are mislabeled. Answer with the digit only."
)

DETECTION_SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a description of a "
    "feature of a language model and a text passage. Decide whether the feature is active anywhere in "
    "the passage, given the description. Answer 1 if it is active or 0 if it is not. "
    "Answer with the digit only."
)

SIMULATION_EV_SYSTEM = (
    "You are a precise scientific assistant who predicts how strongly a feature of a language model "
    "fires on one token, given a description of the feature. You answer with a single digit only."
)

SIMULATION_SYSTEM = (
    "You are a precise scientific assistant who predicts how strongly a feature of a language model "
    "fires, given a description of the feature. You answer with a JSON array only."
)


def fuzz_messages(explanation: str, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": FUZZ_SYSTEM},
            {"role": "user", "content": f"Feature description: {explanation}\n\nExample: {text}\n\n"
                                        "Is every highlighted token correctly labeled? Answer 1 or 0."}]


def detection_messages(explanation: str, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": DETECTION_SYSTEM},
            {"role": "user", "content": f"Feature description: {explanation}\n\nPassage: {text}\n\n"
                                        "Is the feature active in this passage? Answer 1 or 0."}]


def simulation_messages(explanation: str, examples: Sequence[Example]) -> list[dict[str, str]]:
    n = len(examples)
    lines = [f"Feature description: {explanation}", "",
             f"Below are {n} text excerpts. For each, predict how strongly the feature fires on THE FINAL TOKEN "
             "(marked <<like this>>), from 0 (not at all) to 10 (as strongly as it ever does).", ""]
    for j, ex in enumerate(examples, 1):
        lines.append(f"Example {j}: {example_text(ex, mark_final=True)}")
    lines += ["", f"Answer with a JSON array of exactly {n} integers between 0 and 10, one per example, in order."]
    return [{"role": "system", "content": SIMULATION_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


# ---------------------------------------------------------------------------
# Example construction
# ---------------------------------------------------------------------------


def fuzz_highlights(ctx: LatentContexts, rng: np.random.Generator,
                    frac: float = HIGHLIGHT_FRAC) -> list[tuple[list[str], list[int], int]]:
    """(tokens, highlighted positions, label): activating examples (label 1, the positions where
    the latent fires strongly), then non-activating ones (label 0) with n_incorrect =
    ceil(mean highlighted tokens per activating example) distinct random positions."""
    items: list[tuple[list[str], list[int], int]] = []
    counts = []
    for ex in ctx.activating:
        pos = highlight_positions(ex.acts, frac)
        counts.append(len(pos))
        items.append((list(ex.tokens), pos, 1))
    n_incorrect = max(1, math.ceil(float(np.mean(counts)))) if counts else 1
    for ex in ctx.non_activating:
        k = min(n_incorrect, len(ex.tokens))
        pos = sorted(int(p) for p in rng.choice(len(ex.tokens), size=k, replace=False))
        items.append((list(ex.tokens), pos, 0))
    return items


def fuzz_items(ctx: LatentContexts, rng: np.random.Generator,
               frac: float = HIGHLIGHT_FRAC) -> list[tuple[str, int]]:
    """(highlighted text, label) pairs of :func:`fuzz_highlights`."""
    return [(highlight(toks, pos), label) for toks, pos, label in fuzz_highlights(ctx, rng, frac)]


def detection_items(ctx: LatentContexts) -> list[tuple[str, int]]:
    return ([(example_text(ex), 1) for ex in ctx.activating]
            + [(example_text(ex), 0) for ex in ctx.non_activating])


# ---------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------


def _binary_score(client: Any, explanation: str, items: list[tuple[str, int]],
                  make_messages: Callable[[str, str], list[dict[str, str]]]) -> dict[str, Any]:
    batch = [make_messages(explanation, text) for text, _ in items]
    outs = client.generate_batch(batch, BINARY_MAX_TOKENS, temperature=0.0, want_logprobs=True)
    fails = [o for o in outs if isinstance(o, LLMFailure)]
    labels = [lab for _, lab in items]
    if fails:
        return {"score": None, "failed": True, "error": str(fails[0]), "n": len(items), "n_failed_prompts": len(fails),
                "labels": labels}
    preds = [parse_binary(o) for o in outs]
    odds = [binary_log_odds(o) for o in outs]
    return {"score": balanced_accuracy(labels, preds), "auc": roc_auc(labels, odds), "failed": False,
            "n": len(items), "n_unparsed": sum(p is None for p in preds), "labels": labels, "preds": preds,
            "log_odds": odds}


def score_fuzz(client: Any, explanation: str, ctx: LatentContexts, rng: np.random.Generator,
               cfg: Any = None) -> dict[str, Any]:
    """Paulo et al. fuzzing: balanced accuracy of 1/0 "correctly highlighted" answers (chance 0.5)."""
    return _binary_score(client, explanation, fuzz_items(ctx, rng), fuzz_messages)


def score_detection(client: Any, explanation: str, ctx: LatentContexts, rng: np.random.Generator,
                    cfg: Any = None) -> dict[str, Any]:
    """Detection: balanced accuracy of 1/0 "the feature is active here" answers (chance 0.5)."""
    return _binary_score(client, explanation, detection_items(ctx), detection_messages)


def expected_digit(comp: Completion | None) -> float | None:
    """Expected value of the first answer token over the digits 0-9 (its log-probabilities), or None."""
    if comp is None or not comp.first_token_logprobs:
        return None
    w = np.zeros(10)
    for tok, v in comp.first_token_logprobs.items():
        k = tok.strip()
        if len(k) == 1 and k.isdigit() and v is not None and not math.isnan(v):
            w[int(k)] += math.exp(float(v))
    return float((w * np.arange(10)).sum() / w.sum()) if w.sum() > 0 else None


def simulation_ev_messages(explanation: str, text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SIMULATION_EV_SYSTEM},
            {"role": "user", "content": f"Feature description: {explanation}\n\nExample: {text}\n\n"
                                        "How strongly does the feature fire on the final token, marked <<like this>>, "
                                        "from 0 (not at all) to 9 (as strongly as it ever does)? Answer with one digit."}]


def _simulation_logprob(client: Any, explanation: str, exs: Sequence[Example]) -> dict[str, Any]:
    batch = [simulation_ev_messages(explanation, example_text(ex, mark_final=True)) for ex in exs]
    outs = client.generate_batch(batch, 1, temperature=0.0, want_logprobs=True)
    fails = [o for o in outs if isinstance(o, LLMFailure)]
    actual = [float(e.activation) for e in exs]
    if fails:
        return {"score": None, "failed": True, "error": str(fails[0]), "n": len(exs), "mode": "logprob"}
    pred = [expected_digit(o) for o in outs]
    parsed = all(p is not None for p in pred)
    return {"score": spearman_score(actual, pred if parsed else None), "failed": False, "n": len(exs),
            "parsed": parsed, "actual": actual, "predicted": pred, "mode": "logprob"}


def score_simulation(client: Any, explanation: str, ctx: LatentContexts, rng: np.random.Generator,
                     cfg: Any = None) -> dict[str, Any]:
    """Spearman rho between actual and predicted activations of the held-out simulation set.

    ``cfg.simulation_mode`` "json" is the paper's code (one prompt, a JSON array of 0-10
    predictions); "logprob" asks one one-digit question per example and takes the expected
    digit under the judge's first-token probabilities (as OpenAI's simulator does): no
    generation, nothing to parse, and the examples of one latent share their prompt prefix.
    """
    exs = ctx.simulation
    if getattr(cfg, "simulation_mode", "json") == "logprob":
        return _simulation_logprob(client, explanation, exs)
    # a JSON array of n integers 0-10 takes about 3n tokens; a model that rambles is cut there
    max_tokens = max(SIMULATION_MIN_TOKENS, 4 * len(exs) + 16, int(getattr(cfg, "max_new_tokens", 0) or 0))
    try:
        comp = client.generate(simulation_messages(explanation, exs), max_tokens, temperature=0.0)
    except LLMFailure as e:
        return {"score": None, "failed": True, "error": str(e), "n": len(exs)}
    actual = [float(e.activation) for e in exs]
    pred = parse_simulation(comp.text, len(exs))
    return {"score": spearman_score(actual, pred), "failed": False, "n": len(exs), "parsed": pred is not None,
            "actual": actual, "predicted": pred}


def score_embedding(client: Any, explanation: str, ctx: LatentContexts, rng: np.random.Generator,
                    cfg: Any = None) -> dict[str, Any]:
    """delphi's embedding scorer (:mod:`metasae.autointerp.embedding`): no LLM, ROC AUC (chance 0.5)."""
    from metasae.autointerp.embedding import score_embedding as _score

    return _score(client, explanation, ctx, rng, cfg)


SCORERS: dict[str, Callable[..., dict[str, Any]]] = {
    "simulation": score_simulation,
    "fuzz": score_fuzz,
    "detection": score_detection,
    "embedding": score_embedding,
}
JUDGE_FREE_SCORERS = ("embedding",)
"""Scorers that need no judge (the explanation still needs the explainer)."""
