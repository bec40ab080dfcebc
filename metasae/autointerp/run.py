"""Explain and score latents, resumably, and compare matched pairs (SPEC 3.7, Figure 2).

:func:`score_latents` writes one JSON file per (SAE, latent) as soon as that
latent is done, so a long run that dies resumes where it stopped; LLM failures
are recorded as missing (and counted), never as scores, and the run completes.
Each latent is also scored with a *random* explanation (another latent's of the
same SAE, or one of :data:`RANDOM_EXPLANATIONS`) on the very same examples, so every table can show
whether the judge beats chance.  :func:`summarize_pairs` is the paper's paired
comparison over matched joint/solo latents (``scipy.stats.ttest_rel``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metasae.autointerp.contexts import LatentContexts
from metasae.autointerp.explain import EXPLAIN_BATCH, explain_latents, prompt_settings
from metasae.autointerp.llm import LLMFailure
from metasae.autointerp.scorers import JUDGE_FREE_SCORERS, SCORERS
from metasae.io import atomic_write_json

RECORD_VERSION = 3  # 3: embedding scores of snippets ending at the firing token

RANDOM_EXPLANATIONS: tuple[str, ...] = (
    "Names of months and days of the week.", "Words about music, songs and instruments.",
    "HTML tags and markup.", "Verbs in the past tense.", "Mentions of money, prices and payment.",
    "Adjectives describing colour.", "Names of cities and countries.", "Words about food and eating.",
    "The first word of a quotation.", "Tokens inside a URL or a file path.", "Expressions of time such as 'later'.",
    "Words related to illness and healing.", "Superlative adjectives ending in -est.",
    "References to animals such as sheep, lions or birds.", "Question words like 'why' and 'how'.",
    "Negations such as 'not' and 'never'.", "Terms from mathematics such as 'sum' or 'integer'.",
    "Plural nouns.", "Words about war, battles and soldiers.", "Words about ships and sailing.",
    "Mentions of light, fire and brightness.", "The end of a line of code.", "Keyword arguments in function calls.",
    "Words expressing emotion, such as joy or anger.", "Units of measurement.", "Modal verbs like 'should' and 'may'.",
    "Words about buildings, houses and walls.", "Exception and error names in programming.",
    "Words related to travel and journeys.", "Ordinal numbers such as 'first' and 'third'.",
    "Words about cooking and kitchens.", "Words about law, judges and courts.",
    "Comparisons using 'like' or 'as'.", "Tokens that begin a new paragraph.", "Names of programming languages.",
    "Words related to sleep and night.", "Weather words such as rain, wind and cloud.",
    "Possessive pronouns like 'his' and 'their'.", "Words about computers and memory.",
    "Abbreviations written in capital letters.", "Words about plants, trees and seeds.",
    "Verbs of motion such as 'go', 'come' and 'run'.", "Words about writing, books and letters.",
    "The second half of a hyphenated word.", "Words describing size, such as 'great' or 'small'.",
    "Mentions of gold, silver and precious stones.", "Words about teaching and learning.",
    "Quotation marks.", "Words ending in -ly.", "Terms about files, directories and paths.",
)
"""The random-explanation pool: a latent's random baseline is drawn from this list and from the
other latents of the same SAE (never its matched partner's, which explains the same direction).
None of them describes a class of the judge validation set."""


def record_path(out_dir: str | Path, sae_name: str, latent: int) -> Path:
    return Path(out_dir) / sae_name / f"latent_{int(latent):06d}.json"


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return rec if rec.get("version") == RECORD_VERSION else None


def _explainer_of(rec: dict[str, Any]) -> Any:
    """The model that wrote a record's explanation (records written before the judge could differ from the
    explainer name one model, which did both)."""
    j = rec.get("judge") or {}
    return j.get("explainer", j.get("model"))


def _is_final(rec: dict[str, Any] | None, scorers: Sequence[str]) -> bool:
    return bool(rec and rec.get("complete") and rec.get("n_failed", 1) == 0
                and all(s in rec.get("scores", {}) for s in scorers))


def score_latents(sae_name: str, latents: Sequence[int], contexts: dict[int, LatentContexts], client: Any,
                  cfg: Any, out_dir: str | Path, scorers: Sequence[str] | None = None, *, seed: int = 0,
                  random_baseline: bool = True, progress: bool = True,
                  embedding_only: Sequence[int] = (), judge: Any = None,
                  timings: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Explanation, scores and random-explanation scores for each latent, one record per latent.

    ``timings``, when given, gets the seconds spent here added to its ``explain_s`` (the
    explainer's batches) and ``score_s`` (every scorer, the random explanations' included), and
    the explanations generated to ``n_explained``.

    The latents in ``embedding_only`` are scored by the scorers that need no judge (the
    embedding scorer) and nothing else; their other scores are absent, not missing.

    A record is reused when it is complete and had no LLM failure; otherwise
    the latent is redone (with a cached client, only the failed requests go
    out again).  Skipped latents (too few firings) get a record with the reason.
    """
    scorers = list(scorers if scorers is not None else cfg.scorers)
    for s in scorers:
        if s not in SCORERS:
            raise ValueError(f"unknown scorer {s!r} (known: {', '.join(SCORERS)})")
    scorer_client = judge if judge is not None else client  # ``client`` explains, ``judge`` (if given) scores
    judge_rec = {"backend": getattr(scorer_client, "backend_id", "?"),
                 "model": getattr(scorer_client, "model_id", "?"), "explainer": getattr(client, "model_id", "?")}
    bar = _bar(progress)
    latents = [int(i) for i in latents]
    records: dict[int, dict[str, Any]] = {}
    token_counts, explain_context = prompt_settings(cfg)
    cheap = {int(i) for i in embedding_only}
    clock = timings if timings is not None else {}
    for key in ("explain_s", "score_s", "n_explained"):
        clock.setdefault(key, 0.0 if key.endswith("_s") else 0)

    def scorers_of(i: int) -> list[str]:
        return [s for s in scorers if s in JUDGE_FREE_SCORERS] if i in cheap else scorers

    # Phase 1: explanations (needed first: the random baseline borrows other latents' explanations),
    # generated EXPLAIN_BATCH at a time; each record is written as soon as its batch is done.
    pending: list[int] = []

    def explain_pending() -> None:
        if not pending:
            return
        t = time.perf_counter()
        answers = explain_latents(client, [contexts[j] for j in pending], cfg)
        clock["explain_s"] += time.perf_counter() - t
        clock["n_explained"] += len(pending)
        for j, expl in zip(pending, answers):
            rec = records[j]
            if isinstance(expl, LLMFailure):
                rec["explain_failed"] = True
                rec["errors"].append(f"explain: {expl}")
                rec["n_failed"] += 1
            else:
                rec["explanation"] = expl
            atomic_write_json(record_path(out_dir, sae_name, j), rec)
        pending.clear()

    for i in bar(latents, desc=f"{sae_name}: explain"):
        path = record_path(out_dir, sae_name, i)
        old = _load(path)
        if old and (old.get("explain_token_counts", 0), old.get("explain_context", 0)) != (token_counts,
                                                                                          explain_context):
            old = None  # explained with another prompt: explained and scored again
        if old and _explainer_of(old) != judge_rec["explainer"]:
            old = None  # another explainer: explained and scored again
        if old and (old.get("judge") or {}).get("model") != judge_rec["model"]:
            old = {**old, "complete": False}  # another judge: the explanation is kept, the scores are redone
        if _is_final(old, scorers_of(i)):
            records[i] = old  # type: ignore[assignment]
            continue
        ctx = contexts.get(i)
        rec: dict[str, Any] = {"version": RECORD_VERSION, "sae": sae_name, "latent": i, "judge": judge_rec,
                               "explain_token_counts": token_counts, "explain_context": explain_context,
                               "explanation": None, "scores": {}, "random_scores": {}, "details": {},
                               "random_explanation": None, "random_source": None, "errors": [],
                               "n_failed": 0, "complete": False, "skip_reason": ""}
        if ctx is None or not ctx.ok:
            rec["skip_reason"] = "no contexts" if ctx is None else ctx.skip_reason
            rec["scores"] = {s: None for s in scorers_of(i)}
            rec["random_scores"] = {s: None for s in scorers_of(i)}
            rec["complete"] = True
            atomic_write_json(path, rec)
            records[i] = rec
            continue
        records[i] = rec
        if old and old.get("explanation") and not old.get("explain_failed"):
            rec["explanation"] = old["explanation"]
            atomic_write_json(path, rec)
        else:
            pending.append(i)
            if len(pending) == EXPLAIN_BATCH:
                explain_pending()
    explain_pending()

    # Phase 2: scores with the explanation and with a random one, on the same examples.
    pool = {i: r["explanation"] for i, r in records.items() if r.get("explanation")}
    for i in bar(latents, desc=f"{sae_name}: score"):
        rec = records[i]
        if rec["complete"]:
            continue
        expl = rec["explanation"]
        if not expl:
            rec["scores"] = {s: None for s in scorers_of(i)}
            rec["random_scores"] = {s: None for s in scorers_of(i)}
            if not rec.get("explain_failed"):
                rec["skip_reason"] = "empty explanation"
            rec["complete"] = True
            atomic_write_json(record_path(out_dir, sae_name, i), rec)
            continue
        ctx = contexts[i]
        if random_baseline:
            rrng = np.random.default_rng([seed, i, 1])
            others = sorted(j for j in pool if j != i)
            cands = [(pool[j], f"latent {j}") for j in others] + [(e, "pool") for e in RANDOM_EXPLANATIONS]
            rec["random_explanation"], rec["random_source"] = cands[int(rrng.integers(len(cands)))]
        t_score = time.perf_counter()
        for s in scorers_of(i):
            res = SCORERS[s](scorer_client, expl, ctx, np.random.default_rng([seed, i, 2]), cfg)
            rec["scores"][s] = res["score"]
            if "auc" in res:  # binary scorers: the threshold-free companion score
                rec["scores"][f"{s}_auc"] = res["auc"]
            rec["details"][s] = res
            if res.get("failed"):
                rec["n_failed"] += 1
                rec["errors"].append(f"{s}: {res.get('error', '')}")
            if random_baseline:
                rres = SCORERS[s](scorer_client, rec["random_explanation"], ctx, np.random.default_rng([seed, i, 2]),
                                  cfg)
                rec["random_scores"][s] = rres["score"]
                if "auc" in rres:
                    rec["random_scores"][f"{s}_auc"] = rres["auc"]
                rec["details"][f"{s}_random"] = rres
                if rres.get("failed"):
                    rec["n_failed"] += 1
                    rec["errors"].append(f"{s} (random): {rres.get('error', '')}")
        clock["score_s"] += time.perf_counter() - t_score
        rec["complete"] = True
        atomic_write_json(record_path(out_dir, sae_name, i), rec)
    return [records[i] for i in latents]


def count_failed(records: Sequence[dict[str, Any]]) -> int:
    """LLM failures recorded as missing across ``records``."""
    return int(sum(r.get("n_failed", 0) for r in records))


def summarize_pairs(records_joint: Sequence[dict[str, Any]], records_solo: Sequence[dict[str, Any]],
                    scorers: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Paired comparison per scorer over matched pairs (``records_joint[k]`` <-> ``records_solo[k]``).

    Pairs where either score is missing are dropped and counted (``n_dropped``).
    ``pct`` = 100 * (mean_joint - mean_solo) / |mean_solo|; ``t``, ``p`` from
    ``scipy.stats.ttest_rel``; ``mde`` the minimum detectable mean difference (paired,
    alpha 0.05, power 0.8, from the pairs' SD); the random-explanation means show the chance level.
    """
    from scipy.stats import ttest_rel

    from metasae.summary import mde

    if len(records_joint) != len(records_solo):
        raise ValueError(f"records differ in length ({len(records_joint)} joint, {len(records_solo)} solo)")
    if scorers is None:
        seen: list[str] = []
        for r in list(records_joint) + list(records_solo):
            seen += [s for s in r.get("scores", {}) if s not in seen]
        scorers = seen
    out: dict[str, dict[str, Any]] = {}
    for s in scorers:
        pairs = [(rj["scores"].get(s), rs["scores"].get(s)) for rj, rs in zip(records_joint, records_solo)
                 if s in rj.get("scores", {}) or s in rs.get("scores", {})]  # a pair not given this scorer is not dropped
        ok = [(a, b) for a, b in pairs if a is not None and b is not None]
        j = np.array([a for a, _ in ok], dtype=float)
        so = np.array([b for _, b in ok], dtype=float)
        res: dict[str, Any] = {"n_pairs": len(ok), "n_dropped": len(pairs) - len(ok),
                               "mean_joint": None, "mean_solo": None, "delta": None, "pct": None,
                               "t": None, "p": None, "frac_joint_gt_solo": None, "mde": None}
        if ok:
            mj, ms = float(j.mean()), float(so.mean())
            res.update(mean_joint=mj, mean_solo=ms, delta=mj - ms,
                       pct=100.0 * (mj - ms) / abs(ms) if ms != 0 else None,
                       frac_joint_gt_solo=float(np.mean(j > so)))
            if len(ok) >= 2 and np.any(j - so != 0):
                t = ttest_rel(j, so)
                res["t"], res["p"] = _num(t.statistic), _num(t.pvalue)
            # the smallest joint - solo difference these pairs detect (alpha 0.05, power 0.8)
            res["mde"] = mde(list(j - so))
        for name, recs in (("joint", records_joint), ("solo", records_solo)):
            rv = [r.get("random_scores", {}).get(s) for r in recs]
            rv = [v for v in rv if v is not None]
            res[f"mean_random_{name}"] = float(np.mean(rv)) if rv else None
        out[s] = res
    return out


def summarize_vs_random(records: Sequence[dict[str, Any]], scorers: Sequence[str] | None = None,
                        ) -> dict[str, dict[str, Any]]:
    """Per score key: mean of (real - random-explanation score) over the latents that have both,
    with its 95% t CI (``diff``, ``ci_low``, ``ci_high``, ``n``, ``p``): does the judge beat chance?"""
    from scipy import stats

    if scorers is None:
        scorers = []
        for r in records:
            scorers += [s for s in r.get("random_scores", {}) if s not in scorers]
    out: dict[str, dict[str, Any]] = {}
    for s in scorers:
        d = np.array([r["scores"][s] - r["random_scores"][s] for r in records
                      if r.get("scores", {}).get(s) is not None and r.get("random_scores", {}).get(s) is not None])
        res: dict[str, Any] = {"n": int(len(d)), "diff": float(d.mean()) if len(d) else None,
                               "ci_low": None, "ci_high": None, "p": None}
        if len(d) >= 2:
            se = float(d.std(ddof=1) / math.sqrt(len(d)))
            h = float(stats.t.ppf(0.975, len(d) - 1)) * se
            res.update(ci_low=res["diff"] - h, ci_high=res["diff"] + h)
            if se > 1e-12 * max(1.0, abs(res["diff"])):  # constant differences: no test
                res["p"] = _num(stats.ttest_1samp(d, 0.0).pvalue)
        out[s] = res
    return out


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def _bar(enabled: bool):
    if not enabled:
        return lambda it, **kw: it
    from tqdm.auto import tqdm

    return lambda it, **kw: tqdm(it, **kw)


# ---------------------------------------------------------------------------
# Pooled over seeds
# ---------------------------------------------------------------------------


def pooled_pairs(out: str | Path, seeds: Sequence[int]) -> dict[str, Any] | None:
    """The matched pairs autointerp scored on each of ``seeds``, pooled (None when no seed has any).

    Reads what :func:`metasae.pipeline.autointerp_seed` left under ``seed<s>/autointerp``: its
    ``summary.json`` (the pairs, the joint run's name, the time taken) and the record of each
    latent.  Returns ``seeds`` (those with a summary), ``pair_seed`` (each pair's seed),
    ``records_joint`` / ``records_solo`` (pair k of each, seed after seed), ``n_pairs_scored`` and
    ``n_pairs_embedding_only`` (sums), ``n_missing`` (pairs whose record is absent, left out),
    ``joint`` (seed -> the joint run), ``speed`` (seed -> the seed's ``speed``) and ``judge`` (the
    first seed's judge record)."""
    from metasae.paths import seed_dir

    res: dict[str, Any] = {"seeds": [], "pair_seed": [], "records_joint": [], "records_solo": [],
                           "n_pairs_scored": 0, "n_pairs_embedding_only": 0, "n_missing": 0, "joint": {}, "speed": {}}
    for s in seeds:
        adir = seed_dir(Path(out), int(s)) / "autointerp"
        try:
            summ = json.loads((adir / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(summ, dict) or not summ.get("joint"):
            continue
        res["seeds"].append(int(s))
        res["joint"][int(s)] = summ["joint"]
        res["speed"][int(s)] = summ.get("speed")
        res.setdefault("judge", summ.get("judge"))
        res["n_pairs_scored"] += int(summ.get("n_pairs_scored") or 0)
        res["n_pairs_embedding_only"] += int(summ.get("n_pairs_embedding_only") or 0)
        for p in summ.get("pairs") or []:
            rj, rs = _load(record_path(adir, summ["joint"], p["joint"])), _load(record_path(adir, "solo", p["solo"]))
            if rj is None or rs is None:
                res["n_missing"] += 1
                continue
            res["pair_seed"].append(int(s))
            res["records_joint"].append(rj)
            res["records_solo"].append(rs)
    return res if res["seeds"] else None


def summarize_over_seeds(pooled: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per score: the joint - solo difference of each seed's mean over its pairs (``per_seed``), their
    mean, SE, ``n_seeds`` and the one-sample t test against 0 (``p``): the seed as the unit of
    replication, beside :func:`summarize_pairs`'s pairs pooled over seeds."""
    from scipy import stats

    by_seed: dict[str, dict[int, float]] = {}
    for s in pooled["seeds"]:
        idx = [k for k, ps in enumerate(pooled["pair_seed"]) if ps == s]
        summ = summarize_pairs([pooled["records_joint"][k] for k in idx], [pooled["records_solo"][k] for k in idx])
        for scorer, v in summ.items():
            if v.get("delta") is not None:
                by_seed.setdefault(scorer, {})[s] = float(v["delta"])
    out: dict[str, dict[str, Any]] = {}
    for scorer, per in by_seed.items():
        d = np.array(list(per.values()), dtype=float)
        res: dict[str, Any] = {"per_seed": {str(k): v for k, v in per.items()}, "n_seeds": int(len(d)),
                               "delta": float(d.mean()), "se": None, "p": None}
        if len(d) >= 2:
            se = float(d.std(ddof=1) / math.sqrt(len(d)))
            res["se"] = se
            if se > 1e-12 * max(1.0, abs(res["delta"])):
                res["p"] = _num(stats.ttest_1samp(d, 0.0).pvalue)
        out[scorer] = res
    return out


def summarize_pooled(pooled: dict[str, Any]) -> dict[str, Any]:
    """What :func:`pooled_pairs` supports: ``joint_vs_solo`` (:func:`summarize_pairs` over the pooled
    pairs), ``over_seeds`` (:func:`summarize_over_seeds`; None with one seed) and ``vs_random``
    (:func:`summarize_vs_random` on the solo latents)."""
    return {"joint_vs_solo": summarize_pairs(pooled["records_joint"], pooled["records_solo"]),
            "over_seeds": summarize_over_seeds(pooled) if len(pooled["seeds"]) > 1 else None,
            "vs_random": summarize_vs_random(pooled["records_solo"])}
