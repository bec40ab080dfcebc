# ---
# jupyter:
#   metasae: per-seed
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
# * **detection**: activating vs random contexts; balanced accuracy.
#
# Each scorer also scores a random explanation, so the table shows whether the
# judge beats chance. For the binary scorers the area under the ROC curve of the
# judge's log-odds (`fuzz_auc`, `detection_auc`; chance 0.5) is reported too: it
# stays informative when a weak judge answers "1" to everything. On the default profile the judge is SmolLM2-135M-Instruct
# (offline); on the paper profiles an OpenAI-compatible server (e.g. vLLM with
# Qwen2.5-72B-Instruct-AWQ).

# %% tags=["parameters"]
profile = "smoke"
seed = 0
out_dir = ""
figures_dir = ""

# %%
import matplotlib.pyplot as plt
import pandas as pd

from metasae import pipeline
from metasae.report import MIN_DENSITY_PAIRS, plot_score_density_diff, save_figure, save_table

ctx = pipeline.open_run(profile, out_dir, figures_dir)
cfg = ctx.profile.autointerp
run_it = cfg.seed_only < 0 or cfg.seed_only == seed
print(f"judge: {cfg.backend} / {cfg.model}; scorers: {cfg.scorers}; autointerp for this seed: {run_it}")

# %%
if run_it:
    res = pipeline.autointerp_seed(ctx, seed)
    print(f"{res['n_matched_alive']} matched alive pairs, {res['n_pairs_eligible']} with enough firings for every "
          f"context set; {res['n_pairs_scored']} scored; "
          f"{res['n_failed']} LLM requests failed (recorded as missing)")
    summ = pd.DataFrame([{"scorer": s, **v} for s, v in res["summary"].items()])
    save_table(summ, f"autointerp_summary_seed{seed}", ctx.out,
               caption=f"Autointerp (seed {seed}), {res['joint']} vs solo on matched pairs: mean scores, paired t "
                       f"(scipy ttest_rel), % pairs joint > solo, random-explanation means (chance check); judge "
                       f"{cfg.model}")
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
# ## Figure 2: density of scores, joint minus solo
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
                 f"(judge {cfg.model})")
    fig.tight_layout()
    save_figure(fig, f"fig2_autointerp_density_seed{seed}", ctx.figures,
                caption=f"Figure 2 (seed {seed}): density of autointerp scores, joint and solo, and joint minus solo, "
                        f"per score; n = pairs scored on both sides (pairs one by one below {MIN_DENSITY_PAIRS})")
    print("pairs scored on both sides:", n_by_score)
