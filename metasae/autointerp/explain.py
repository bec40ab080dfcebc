"""The explainer (SPEC 3.7, paper-notes 5.2).

As in the paper's released code: the 50 explanation examples are shown with
their strengths normalised 0-10 against the latent's maximum, the final token
of each example (where the latent fired) is marked, and the model is asked for
ONE concise sentence at temperature 0.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from metasae.autointerp.contexts import Example, LatentContexts, example_text

EXPLAINER_SYSTEM = (
    "You are a precise scientific assistant who studies the internal features of a language model. "
    "You read text excerpts in which one feature is active and describe, in one concise sentence, "
    "what the feature detects. You never add commentary."
)

EXPLAINER_MAX_TOKENS = 150


def explainer_messages(examples: Sequence[Example]) -> list[dict[str, str]]:
    lines = [
        "Below are text excerpts in which one latent of a sparse autoencoder fires.",
        "THE FINAL TOKEN of each example, marked <<like this>>, is the token where the latent fired.",
        "Each example has a strength from 0 to 10 (10 = the latent's strongest activation).",
        "",
    ]
    for j, ex in enumerate(examples, 1):
        lines.append(f"Example {j} (strength {ex.strength}): {example_text(ex, mark_final=True)}")
    lines += [
        "",
        "In ONE concise sentence, what does this latent detect at the marked token? "
        "Reply with the sentence only.",
    ]
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


def explain_latent(client: Any, ctx: LatentContexts, cfg: Any) -> str | None:
    """One explanation, or None when the answer is empty; :class:`LLMFailure` propagates
    so that the caller can count it."""
    max_tokens = max(int(getattr(cfg, "max_new_tokens", EXPLAINER_MAX_TOKENS)), 16)
    comp = client.generate(explainer_messages(ctx.explain), max_tokens, temperature=0.0)
    return parse_explanation(comp.text)
