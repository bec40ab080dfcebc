"""The explainer (SPEC 3.7, paper-notes 5.2).

As in the paper's released code: the 50 explanation examples are shown with
their strengths normalised 0-10 against the latent's maximum, the final token
of each example (where the latent fired) is marked, and the model is asked for
ONE concise sentence at temperature 0.  ``explain_token_counts`` > 0 (the default
profile's choice) also lists the most frequent marked tokens and asks for them to be
named: a small explainer otherwise often answers with a generic sentence.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from metasae.autointerp.contexts import Example, LatentContexts, example_text
from metasae.autointerp.llm import LLMFailure, generate_batch

EXPLAINER_SYSTEM = (
    "You are a precise scientific assistant who studies the internal features of a language model. "
    "You read text excerpts in which one feature is active and describe, in one concise sentence, "
    "what the feature detects. You never add commentary."
)

EXPLAINER_MAX_TOKENS = 150
SPECIFIC = ("Be specific: name the tokens, words or pattern it responds to and the context it needs, "
            "not a generic description. ")
"""Added to the question when the marked tokens are listed."""


def marked_token_counts(examples: Sequence[Example], n: int) -> list[tuple[str, int]]:
    """The n most frequent marked (final) tokens of the examples, as shown to the explainer
    (whitespace at the ends stripped, newlines escaped), with their counts; ties in first-seen order."""
    counts: dict[str, int] = {}
    for ex in examples:
        if ex.tokens:
            tok = ex.tokens[-1].strip().replace("\n", "\\n") or ex.tokens[-1].replace("\n", "\\n")
            counts[tok] = counts.get(tok, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:n]  # sorted() is stable


def explainer_messages(examples: Sequence[Example], token_counts: int = 0, context: int = 0) -> list[dict[str, str]]:
    """The explainer's prompt.  ``token_counts`` > 0 adds a line listing that many of the most
    frequent marked tokens with their counts (a small explainer otherwise tends to answer with a
    sentence that names no token, e.g. "a specific word or phrase").  ``context`` > 0 shows only
    the last ``context`` tokens of each example (the firing token and what precedes it)."""
    if context > 0:
        examples = [dataclasses.replace(ex, tokens=ex.tokens[-context:]) for ex in examples]
    lines = [
        "Below are text excerpts in which one latent of a sparse autoencoder fires.",
        "THE FINAL TOKEN of each example, marked <<like this>>, is the token where the latent fired.",
        "Each example has a strength from 0 to 10 (10 = the latent's strongest activation).",
        "",
    ]
    for j, ex in enumerate(examples, 1):
        lines.append(f"Example {j} (strength {ex.strength}): {example_text(ex, mark_final=True)}")
    question = "In ONE concise sentence, what does this latent detect at the marked token? "
    if token_counts > 0:
        listed = ", ".join(f"<<{tok}>> ({c})" for tok, c in marked_token_counts(examples, token_counts))
        lines += ["", f"The marked tokens, most frequent first (count): {listed}"]
        question += SPECIFIC
    lines += ["", question + "Reply with the sentence only."]
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


_MARKER = re.compile(r"^(?:[-*#>]+|\d+[.)])\s+")
_LABEL = re.compile(r"^\**\s*(?:explanation|answer|description|sentence|summary)\s*\**\s*:\s*\**\s*", re.IGNORECASE)


def parse_explanation(text: str | None, max_chars: int = 400) -> str | None:
    """The first non-empty line, without list markers, labels or quotes; empty -> None (missing)."""
    if not text:
        return None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        line = _LABEL.sub("", _MARKER.sub("", line, count=1), count=1)
        line = line.strip().strip("*").strip()
        if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
            line = line[1:-1].strip()
        if line:
            return line[:max_chars]
    return None


EXPLAIN_BATCH = 8
"""Explanations generated together (left-padded) by :func:`explain_latents`.  On 2 CPU cores
with the 1.5B explainer and ~1,400-token prompts, 5.2 s each against 7.4 s one at a time
(``benchmarks/explain_batch.py``): decoding reads the weights once per step for the whole
batch; the prompts' prefill, most of what is left, does not shrink."""


def prompt_settings(cfg: Any) -> tuple[int, int]:
    """(explain_token_counts, explain_context) of an autointerp config: what shapes the prompt."""
    return int(getattr(cfg, "explain_token_counts", 0)), int(getattr(cfg, "explain_context", 0))


def _max_tokens(cfg: Any) -> int:
    return max(int(getattr(cfg, "max_new_tokens", EXPLAINER_MAX_TOKENS)), 16)


def explain_latent(client: Any, ctx: LatentContexts, cfg: Any) -> str | None:
    """One explanation, or None when the answer is empty; :class:`LLMFailure` propagates
    so that the caller can count it."""
    out = explain_latents(client, [ctx], cfg)[0]
    if isinstance(out, LLMFailure):
        raise out
    return out


def explain_latents(client: Any, ctxs: Sequence[LatentContexts], cfg: Any) -> list[str | None | LLMFailure]:
    """The explanations of several latents in one batch (greedy): per latent the sentence,
    None when the answer is empty, or the :class:`LLMFailure` (returned in place, so that one
    failed request never loses the others).  A client without ``generate_batch`` is asked
    one latent at a time."""
    batch = [explainer_messages(c.explain, *prompt_settings(cfg)) for c in ctxs]
    comps = generate_batch(client, batch, _max_tokens(cfg), temperature=0.0)
    return [c if isinstance(c, LLMFailure) else parse_explanation(c.text) for c in comps]
