# metasae: per-seed
# ---
# jupyter:
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
import numpy as np
import pandas as pd

from metasae import pipeline
from metasae.report import save_figure, save_table

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

# %%
if run_it and not len(per_pair):
    print("no matched pair has enough firings on the autointerp split for every context set: no Figure 2")
if run_it and len(per_pair):
    fig, axes = plt.subplots(1, len(cfg.scorers), figsize=(4.5 * len(cfg.scorers), 3.4), squeeze=False)
    for ax, s in zip(axes[0], cfg.scorers):
        j = per_pair[f"joint_{s}"].dropna().astype(float)
        so = per_pair[f"solo_{s}"].dropna().astype(float)
        lo, hi = (-1, 1) if s == "simulation" else (0, 1)
        bins = np.linspace(lo, hi, 11)
        hj, _ = np.histogram(j, bins=bins, density=True)
        hs, _ = np.histogram(so, bins=bins, density=True)
        ax.bar((bins[:-1] + bins[1:]) / 2, hj - hs, width=(hi - lo) / 10 * 0.9)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{s}: n={len(j)} joint, {len(so)} solo")
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("density(joint) − density(solo)")
    fig.suptitle(f"Figure 2 (seed {seed}): autointerp score density, joint minus solo")
    fig.tight_layout()
    save_figure(fig, f"fig2_autointerp_density_seed{seed}", ctx.figures,
                caption=f"Figure 2 (seed {seed}): density of autointerp scores, joint minus solo, per scorer")
