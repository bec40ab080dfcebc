"""A judge validation set with known answers (issue: autointerp that means something offline).

Synthetic "latents" fire exactly on a known token or token class of the real
autointerp split: lexical and syntactic ones (a word, digits, a punctuation mark,
the word after "the") alternating with semantic ones (words about water, family
members, body parts, numbers written as words, royalty).
Their contexts are built by the very code that builds a real latent's
(:func:`~metasae.autointerp.contexts.build_latent_contexts`), and each is scored
by every scorer with three explanations: the correct one, a wrong but plausible
one (a sibling class: "Lord" for "God", commas for full stops) and a random one
from :data:`~metasae.autointerp.run.RANDOM_EXPLANATIONS`.  The scorer's AUC at
telling correct from random (and from wrong) explanations, pooled over latents
with a bootstrap CI over latents, is what says whether a judge can be trusted at
all; it runs for any backend, an OpenAI-compatible server included.

The simulation set of a synthetic latent is half windows that end on a firing
token (activation 1), half windows that end on a non-firing one (activation 0):
a binary latent's firing windows alone all have the same activation, and a
Spearman rho over constants is undefined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from metasae.autointerp.contexts import Example, Firings, LatentContexts, TokenStrings, build_latent_contexts
from metasae.autointerp.llm import LLMFailure
from metasae.autointerp.scorers import SCORERS, roc_auc
from metasae.io import atomic_write_json

RECORD_VERSION = 2  # 2: embedding scores of snippets ending at the firing token
KINDS = ("correct", "wrong", "random")


@dataclass(frozen=True)
class SyntheticLatent:
    name: str
    fires: Callable[[str], bool]
    """fires(token) on the decoded token string (of the previous token with ``on_previous``)."""
    correct: str
    wrong: str
    on_previous: bool = False


def _is(word: str) -> Callable[[str], bool]:
    return lambda s: s.strip() == word


def _any(*words: str) -> Callable[[str], bool]:
    ws = frozenset(words)
    return lambda s: s.strip().lower() in ws


VALIDATION_LATENTS: tuple[SyntheticLatent, ...] = (
    # lexical and syntactic classes alternate with semantic ones: the first n with enough
    # firings on the autointerp split make up the set
    SyntheticLatent("digits", lambda s: s.strip().isdigit(),
                    "Numbers written with digits (numerals such as 1, 23 or 400).",
                    "Punctuation marks such as commas, colons and full stops."),
    SyntheticLatent("water", _any("water", "waters", "sea", "seas", "river", "rivers", "rain", "flood", "waves",
                                  "stream", "streams", "springs", "fountain", "fountains"),
                    "Words about water: sea, river, rain, flood, springs.",
                    "Words about fire, flames and burning."),
    SyntheticLatent("comma", _is(","), "Commas.", "Full stops at the end of a sentence."),
    SyntheticLatent("family", _any("father", "fathers", "mother", "son", "sons", "daughter", "daughters", "brother",
                                   "brothers", "sister", "wife", "husband", "children", "child"),
                    "Family members such as father, son, mother, brother or wife.",
                    "Rulers and officials such as king, prince or governor."),
    SyntheticLatent("lord", _is("Lord"), 'The word "Lord".', 'The word "God".'),
    SyntheticLatent("number_words", _any("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                                         "twelve", "twenty", "forty", "hundred", "thousand"),
                    "Numbers written out as words (one, two, seven, hundred, thousand).",
                    "Numbers written with digits (1, 23, 400)."),
    SyntheticLatent("after_the", lambda s: s.strip().lower() == "the",
                    'The word that comes right after "the" (the noun or adjective it introduces).',
                    'The word "the" itself.', on_previous=True),
    SyntheticLatent("body", _any("hand", "hands", "eye", "eyes", "heart", "head", "mouth", "face", "feet", "foot",
                                 "arm", "ear", "ears"),
                    "Parts of the body such as hand, eye, heart, head or feet.",
                    "Items of clothing such as robe, garment or sandals."),
    SyntheticLatent("open_paren", lambda s: "(" in s, 'Opening parentheses "(".', 'Closing parentheses ")".'),
    SyntheticLatent("royalty", _any("king", "kings", "prince", "princes", "queen", "throne", "kingdom", "governor"),
                    "Royalty and rule: king, prince, queen, throne, kingdom.",
                    "Family members such as father, son or brother."),
    SyntheticLatent("and", _is("and"), 'The conjunction "and".', 'The conjunction "or".'),
    SyntheticLatent("period", _is("."), "Full stops (periods) that end a sentence.", "Commas inside a sentence."),
    SyntheticLatent("god", _is("God"), 'The word "God".', 'The word "Lord".'),
    SyntheticLatent("he", lambda s: s.strip().lower() == "he", 'The pronoun "he".', 'The pronoun "she".'),
    SyntheticLatent("of", _is("of"), 'The preposition "of".', 'The preposition "in".'),
    SyntheticLatent("said", _is("said"), 'The verb "said".', 'The verb "asked".'),
    SyntheticLatent("colon", _is(":"), "Colons.", "Semicolons."),
    SyntheticLatent("function", lambda s: s.strip().lower() in ("function", "functions"),
                    'The word "function" in programming documentation.',
                    'The word "method" in programming documentation.'),
    SyntheticLatent("the", lambda s: s.strip().lower() == "the", 'The word "the".', 'The word "a".'),
    SyntheticLatent("to", _is("to"), 'The word "to".', 'The word "for".'),
    SyntheticLatent("close_paren", lambda s: ")" in s, 'Closing parentheses ")".', 'Opening parentheses "(".'),
)


def firing_masks(tokens_RT: Any, mask_RT: Any, strings: TokenStrings,
                 latents: Sequence[SyntheticLatent] = VALIDATION_LATENTS) -> np.ndarray:
    """(L, R, T) bool: where each synthetic latent fires (valid tokens only)."""
    tok = np.asarray(tokens_RT)
    valid = np.asarray(mask_RT).astype(bool)
    uniq, inv = np.unique(tok, return_inverse=True)
    inv = inv.reshape(tok.shape)
    strs = strings(uniq.tolist())
    prev_inv = np.concatenate([np.full((tok.shape[0], 1), -1), inv[:, :-1]], axis=1)
    out = np.zeros((len(latents), *tok.shape), bool)
    for j, lat in enumerate(latents):
        hit = np.array([lat.fires(s) for s in strs] + [False])  # index -1: no previous token
        out[j] = (hit[prev_inv] if lat.on_previous else hit[inv]) & valid
    return out


def synthetic_firings(masks_LRT: np.ndarray) -> Firings:
    """The masks as :class:`Firings` with activation 1.0 wherever a latent fires."""
    L, R, T = masks_LRT.shape
    rows, pos, ptr = [], [], [0]
    for j in range(L):
        r, t = np.nonzero(masks_LRT[j])
        rows.append(r.astype(np.int32))
        pos.append(t.astype(np.int32))
        ptr.append(ptr[-1] + len(r))
    rows_a, pos_a = np.concatenate(rows), np.concatenate(pos)
    return Firings(latents=np.arange(L, dtype=np.int64), ptr=np.asarray(ptr, np.int64), rows=rows_a, pos=pos_a,
                   acts=np.ones(len(rows_a), np.float32), n_rows=R, n_pos=T)


def build_validation_contexts(tokens_RT: Any, mask_RT: Any, cfg: Any, seed: int, tokenizer: Any = None,
                              latents: Sequence[SyntheticLatent] = VALIDATION_LATENTS,
                              n_latents: int | None = None) -> dict[str, LatentContexts]:
    """Contexts of the first ``n_latents`` synthetic latents with enough firings (in list order)."""
    strings = TokenStrings(tokenizer)
    tok = np.asarray(tokens_RT)
    valid = np.asarray(mask_RT).astype(bool)
    masks = firing_masks(tok, valid, strings, latents)
    fir = synthetic_firings(masks)
    W = int(cfg.window)
    n_want = len(latents) if n_latents is None else int(n_latents)
    out: dict[str, LatentContexts] = {}
    for j, lat in enumerate(latents):
        if len(out) >= n_want:
            break
        rng = np.random.default_rng([seed, 29, j])

        def wacts(windows: Sequence[tuple[int, int]], j: int = j) -> np.ndarray:
            return np.stack([masks[j, r, e - W + 1:e + 1] for r, e in windows]).astype(np.float32)

        ctx = build_latent_contexts(j, fir, tok, cfg, rng, sae=None, acts_RTD=None, thresholds_F=None,
                                    mask_RT=valid, token_strings=strings, window_acts=wacts)
        if not ctx.ok:
            continue
        # simulation: as many windows ending on a non-firing token as on a firing one
        cand_r, cand_t = np.nonzero(valid & ~masks[j])
        keep = cand_t >= W - 1
        cand_r, cand_t = cand_r[keep], cand_t[keep]
        n_half = max(1, len(ctx.simulation) // 2)
        pick = rng.choice(len(cand_r), size=min(n_half, len(cand_r)), replace=False)
        zeros = [Example(row=int(cand_r[i]), end=int(cand_t[i]), tokens=strings(tok[cand_r[i], cand_t[i] - W + 1:
                                                                                    cand_t[i] + 1]),
                         acts=np.zeros(W, np.float32), activation=0.0, quintile=-1) for i in pick]
        sim = list(ctx.simulation)[:n_half] + zeros
        ctx.simulation = [sim[i] for i in rng.permutation(len(sim))]
        out[lat.name] = ctx
    return out


def record_path(out_dir: str | Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.json"


def score_validation(contexts: dict[str, LatentContexts], client: Any, cfg: Any, out_dir: str | Path, *,
                     scorers: Sequence[str] | None = None, seed: int = 0,
                     latents: Sequence[SyntheticLatent] = VALIDATION_LATENTS,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Every scorer on every synthetic latent with its correct, wrong and random explanation.

    One JSON record per latent, reused when complete; an LLM failure leaves that score
    missing (None) and counted in ``n_failed``, and the latent is redone on the next run.
    """
    from metasae.autointerp.run import RANDOM_EXPLANATIONS, _bar

    scorers = list(scorers if scorers is not None else cfg.scorers)
    by_name = {lat.name: lat for lat in latents}
    judge = {"backend": getattr(client, "backend_id", "?"), "model": getattr(client, "model_id", "?")}
    records = []
    for name in _bar(progress)(list(contexts), desc="judge validation set"):
        path = record_path(out_dir, name)
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = None
            if (old and old.get("version") == RECORD_VERSION and old.get("n_failed") == 0
                    and old.get("judge") == judge and all(s in old["scores"]["correct"] for s in scorers)):
                records.append(old)
                continue
        lat, ctx = by_name[name], contexts[name]
        rng = np.random.default_rng([seed, 31, sorted(by_name).index(name)])
        expl = {"correct": lat.correct, "wrong": lat.wrong,
                "random": RANDOM_EXPLANATIONS[int(rng.integers(len(RANDOM_EXPLANATIONS)))]}
        rec: dict[str, Any] = {"version": RECORD_VERSION, "latent": name, "judge": judge, "explanations": expl,
                               "scores": {k: {} for k in KINDS}, "n_failed": 0, "errors": [],
                               "n_firings": ctx.n_firings}
        for s in scorers:
            for k in KINDS:
                res = SCORERS[s](client, expl[k], ctx, np.random.default_rng([seed, 37, sorted(by_name).index(name)]), cfg)
                if res.get("failed"):
                    rec["n_failed"] += 1
                    rec["errors"].append(f"{s} ({k}): {res.get('error', '')}")
                rec["scores"][k][s] = res.get("score")
                if "auc" in res:
                    rec["scores"][k][f"{s}_auc"] = res["auc"]
        atomic_write_json(path, rec)
        records.append(rec)
    return records


def summarize_validation(records: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0,
                         ) -> dict[str, dict[str, Any]]:
    """Per score key: mean score per explanation kind, and the ROC AUC of the score at telling
    the correct explanations from the random (``auc_vs_random``) and from the wrong ones
    (``auc_vs_wrong``), pooled over latents, with 95% bootstrap CIs over latents."""
    keys: list[str] = []
    for r in records:
        keys += [k for k in r["scores"]["correct"] if k not in keys]
    rng = np.random.default_rng([seed, 41])
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        vals = {k: [r["scores"][k].get(key) for r in records] for k in KINDS}
        ok = [i for i in range(len(records)) if all(vals[k][i] is not None for k in KINDS)]
        res: dict[str, Any] = {"n_latents": len(ok), "n_missing": len(records) - len(ok)}
        for k in KINDS:
            res[f"mean_{k}"] = float(np.mean([vals[k][i] for i in ok])) if ok else None
        for other in ("random", "wrong"):
            def auc(idx: Sequence[int], other: str = other) -> float | None:
                c = [vals["correct"][i] for i in idx]
                o = [vals[other][i] for i in idx]
                return roc_auc([1] * len(c) + [0] * len(o), c + o)

            res[f"auc_vs_{other}"] = auc(ok) if len(ok) >= 2 else None
            boots = [auc(list(rng.choice(ok, size=len(ok)))) for _ in range(n_boot)] if len(ok) >= 2 else []
            boots = [b for b in boots if b is not None]
            res[f"auc_vs_{other}_ci"] = ([float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
                                         if boots else None)
        out[key] = res
    return out


__all__ = ["SyntheticLatent", "VALIDATION_LATENTS", "firing_masks", "synthetic_firings",
           "build_validation_contexts", "score_validation", "summarize_validation", "KINDS"]
