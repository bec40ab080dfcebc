# ---
# jupyter:
#   metasae: per-seed; after 02_cooccurrence; prepare judge_validation after 00_activations
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Autointerp on Hungarian-matched pairs: Figure 2
#
# Joint latents (selected configuration) are matched one-to-one to solo latents on
# decoder cosine (Hungarian), keeping pairs where both are alive (SPEC §3.6). A
# random sample of pairs sized to the profile's budget is explained and scored:
#
# * **simulation**: what the paper's released code computes and the source of its
#   numbers (0.248 vs 0.230): the judge predicts 0–10 activations for held-out
#   contexts; score = Spearman ρ;
# * **fuzz**: what the paper *describes* (Paulo et al. 2024): highlighted tokens,
#   correctly vs randomly labelled; score = balanced accuracy (chance 0.5);
# * **detection**: activating vs random contexts; balanced accuracy;
# * **embedding** (delphi's): no LLM; a sentence encoder's cosine similarity of the
#   explanation to activating vs non-activating passages (the text up to the firing token,
#   1, 4 and 16 tokens long; a random token for non-activating ones); ROC AUC (chance 0.5).
#
# Each scorer also scores a random explanation (another latent's, or one from a fixed
# pool of 50), so the tables show whether the judge beats chance. For the binary
# scorers the area under the ROC curve of the judge's log-odds (`fuzz_auc`,
# `detection_auc`; chance 0.5) is reported too. On the default profile the judge is
# Qwen2.5-Coder-1.5B-Instruct (offline, on the CPU), with the simulation asked one
# digit per example (`simulation_mode = "logprob"`); on the paper profiles an
# OpenAI-compatible server (e.g. vLLM with Qwen2.5-72B-Instruct-AWQ).
#
# Before any real latent, the judge is checked on a **validation set with known
# answers**: synthetic latents that fire exactly on a token class of the corpus
# (digits, commas, "Lord", the word after "the", ...), each scored with its correct
# explanation, a wrong but plausible one and a random one.

# %% tags=["parameters"]
profile = "smoke"
seed = 0
out_dir = ""
figures_dir = ""

# %%
import matplotlib.pyplot as plt
import pandas as pd

from metasae import pipeline
from metasae.autointerp.llm import model_label
from metasae.report import (MIN_DENSITY_PAIRS, plot_autointerp_bars, plot_score_density_diff, plot_validation_auc,
                            save_figure, save_table)

ctx = pipeline.open_run(profile, out_dir, figures_dir)
cfg = ctx.profile.autointerp
run_it = cfg.seed_only < 0 or cfg.seed_only == seed
judge_name = model_label(cfg, "judge")
print(f"explainer: {cfg.backend} / {model_label(cfg)}; judge: {judge_name}; scorers: {cfg.scorers}; "
      f"autointerp for this seed: {run_it}")

# %% [markdown]
# ## Can the judge be trusted? The validation set
# AUC of each score at telling the correct explanation from a random one and from a
# wrong but plausible one, pooled over the synthetic latents (bootstrap 95% CI over
# latents). 0.5 is chance; the dotted line marks 0.8.

# %%
if run_it and cfg.validation and seed == ctx.profile.seeds[0]:  # once per run: it does not depend on the seed
    val = pipeline.judge_validation(ctx)
    vrows = [{"score": k, **{c: v for c, v in r.items() if not c.endswith("_ci")},
              "auc_vs_random_ci": r["auc_vs_random_ci"], "auc_vs_wrong_ci": r["auc_vs_wrong_ci"]}
             for k, r in val["summary"].items()]
    vtab = pd.DataFrame(vrows)
    save_table(vtab, "autointerp_validation", ctx.out,
               caption=f"Judge validation set ({len(val['latents'])} synthetic latents: "
                       f"{', '.join(val['latents'])}): mean score with the correct, wrong and random explanation, "
                       f"and the AUC of correct vs random / vs wrong (bootstrap 95% CI over latents); judge "
                       f"{judge_name}; {val['n_failed']} requests failed (missing)")
    display(vtab)
    fig, ax = plt.subplots(figsize=(1.3 * len(vrows) + 2, 3.4))
    plot_validation_auc(ax, val["summary"])
    ax.set_title(f"Judge validation ({judge_name}): {len(val['latents'])} synthetic latents with known answers")
    fig.tight_layout()
    save_figure(fig, "fig_judge_validation", ctx.figures,
                caption="Judge validation set: AUC of each score at telling correct from random and from wrong "
                        "explanations (bootstrap 95% CI over synthetic latents; chance 0.5, dotted 0.8)")

# %% [markdown]
# ## Real latents

# %%
if run_it:
    res = pipeline.autointerp_seed(ctx, seed)
    print(f"{res['n_matched_alive']} matched alive pairs, {res['n_pairs_eligible']} with enough firings for every "
          f"context set; {res['n_pairs_scored']} scored by every scorer, "
          f"{res.get('n_pairs_embedding_only', 0)} more by the embedding scorer alone; "
          f"{res['n_failed']} LLM requests failed (recorded as missing)")
    summ = pd.DataFrame([{"scorer": s, **v} for s, v in res["summary"].items()])
    save_table(summ, f"autointerp_summary_seed{seed}", ctx.out,
               caption=f"Autointerp (seed {seed}), {res['joint']} vs solo on matched pairs: mean scores, paired t "
                       f"(scipy ttest_rel), % pairs joint > solo, random-explanation means (chance check); judge "
                       f"{judge_name}")
    display(summ)

# %%
if run_it:
    per_pair = []
    for p, rj, rs in zip(res["pairs"], res["records_joint"], res["records_solo"]):
        row = {"joint_latent": p["joint"], "solo_latent": p["solo"], "cosine": p["cosine"],
               "joint_explanation": rj.get("explanation"), "solo_explanation": rs.get("explanation")}
        for s in sorted(set(rj["scores"]) | set(rs["scores"])):
            row[f"joint_{s}"] = rj["scores"].get(s)
            row[f"solo_{s}"] = rs["scores"].get(s)
        per_pair.append(row)
    per_pair = pd.DataFrame(per_pair)
    save_table(per_pair, f"autointerp_pairs_seed{seed}", ctx.out,
               caption=f"Per-pair explanations and scores (seed {seed})")
    display(per_pair)

# %% [markdown]
# ## Does the judge beat a random explanation on real latents?
# Mean of (score with the latent's explanation − score with a random one) over the
# latents of each SAE, with its 95% t CI.

# %%
if run_it:
    vr = pd.DataFrame([{"sae": side, "score": k, **v} for side in ("solo", "joint")
                       for k, v in res["vs_random"][side].items()])
    save_table(vr, f"autointerp_vs_random_seed{seed}", ctx.out,
               caption=f"Real minus random-explanation score per latent (seed {seed}), mean and 95% t CI; "
                       f"judge {judge_name}")
    display(vr)

# %% [markdown]
# ## Figure 2: joint vs solo, with error bars and the random-explanation baseline

# %%
if run_it:
    keys = []
    for s in cfg.scorers:
        keys += [s] + ([f"{s}_auc"] if f"joint_{s}_auc" in per_pair else [])
    bar_rows = [{"scorer": k, "joint": list(per_pair.get(f"joint_{k}", ())), "solo": list(per_pair.get(f"solo_{k}", ())),
                 "joint_random": [r.get("random_scores", {}).get(k) for r in res["records_joint"]],
                 "solo_random": [r.get("random_scores", {}).get(k) for r in res["records_solo"]]} for k in keys]
    fig, ax = plt.subplots(figsize=(1.6 * len(keys) + 2, 3.6))
    ns = plot_autointerp_bars(ax, bar_rows)
    ax.set_title(f"Figure 2 (seed {seed}): {res['joint']} vs solo over matched pairs (judge {judge_name})")
    fig.tight_layout()
    save_figure(fig, f"fig2_autointerp_seed{seed}", ctx.figures,
                caption=f"Figure 2 (seed {seed}): mean autointerp score of joint and solo latents over matched pairs "
                        f"(95% t CI over pairs), each beside its random-explanation baseline (hatched); "
                        f"n pairs per scorer: {dict(zip(keys, ns))}")

# %% [markdown]
# ## Figure 2 as the paper draws it: density of scores, joint minus solo
# One panel per score (the AUC beside each binary scorer), over the pairs scored on
# both sides. With fewer than `MIN_DENSITY_PAIRS` such pairs a density would be noise:
# the panel then shows each pair's two scores and says "not enough data".

# %%
if run_it:
    scores = []
    for s in cfg.scorers:
        scores += [s] + ([f"{s}_auc"] if f"joint_{s}_auc" in per_pair else [])
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores), 3.4), squeeze=False)
    n_by_score = {s: plot_score_density_diff(ax, per_pair.get(f"joint_{s}", ()), per_pair.get(f"solo_{s}", ()),
                                             title=s, score_range=(-1, 1) if s == "simulation" else (0, 1))
                  for ax, s in zip(axes[0], scores)}
    fig.suptitle(f"Figure 2 (seed {seed}): autointerp scores, {res['joint']} vs solo over matched pairs "
                 f"(judge {judge_name})")
    fig.tight_layout()
    save_figure(fig, f"fig2_autointerp_density_seed{seed}", ctx.figures,
                caption=f"Figure 2 (seed {seed}): density of autointerp scores, joint and solo, and joint minus solo, "
                        f"per score; n = pairs scored on both sides (pairs one by one below {MIN_DENSITY_PAIRS})")
    print("pairs scored on both sides:", n_by_score)
