# ---
# jupyter:
#   metasae: after 02_cooccurrence, 03_autointerp
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
# # 6. Across seeds: error bars, tests across seeds, baselines and ablations
#
# What the paper could not show with one run per cell (SPEC §5): every headline
# number as a mean over seeds with its standard error (n shown); the joint-vs-solo
# comparison as a t-test paired by seed (the seed, not the latent pair, is the unit
# of replication); independent solos (run-to-run |φ| variation); the λ₂ = 0 control;
# the meta-size ablation; an orthogonality-penalty baseline at matched
# reconstruction cost; convergence curves; autointerp across seeds.

# %% tags=["parameters"]
profile = "smoke"
seeds = "0"
out_dir = ""
figures_dir = ""

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from metasae import pipeline
from metasae.aggregate import aggregate_rows, matched_reconstruction, paired_by_seed
from metasae.report import (format_tokens_axis, plot_autointerp_bars, plot_phi_density, plot_phi_density_diff,
                            save_figure, save_table)

ctx = pipeline.open_run(profile, out_dir, figures_dir, seeds)
seed_list = ctx.profile.seeds
selected = pipeline.selected_config(ctx, seed_list[0])
by_seed = {s: pipeline.grid_rows(ctx, pipeline.evaluate_seed(ctx, s, progress=False)) for s in seed_list}
metrics = ["mean_abs_phi", "delta_abs_phi_pct", "mse", "delta_l2_pct", "delta_ce_pct", "l0", "dead"]
agg = pd.DataFrame(aggregate_rows(by_seed, "run", metrics, carry=["role", "lambda2", "sigma2", "meta_latents",
                                                                  "ortho_coef"]))
print(f"seeds: {seed_list}; selected configuration: {selected}")

# %% [markdown]
# ## Table 1 over seeds (mean ± SE)

# %%
def pm(m, s, digits=2):
    return f"{m:.{digits}f} ± {s:.{digits}f}" if np.isfinite(s) else f"{m:.{digits}f}"

t1 = agg[agg.role.isin(["solo", "grid", "control"])].sort_values(["lambda2", "sigma2"])
table = [{"run": r.run, "lambda2": r.lambda2, "sigma2": r.sigma2,
          "delta_abs_phi_pct": pm(r.delta_abs_phi_pct_mean, r.delta_abs_phi_pct_se),
          "delta_l2_pct": pm(r.delta_l2_pct_mean, r.delta_l2_pct_se),
          "delta_ce_pct": pm(r.delta_ce_pct_mean, r.delta_ce_pct_se),
          "mean_abs_phi": pm(r.mean_abs_phi_mean, r.mean_abs_phi_se, 5), "n_seeds": r.n_seeds}
         for r in t1.itertuples()]
save_table(table, "table1_grid_seeds", ctx.out,
           caption=f"Table 1 over seeds {seed_list}: mean ± standard error (n = n_seeds); Delta vs the solo SAE of "
                   f"the same seed; Delta CE % = CE overhead as % of clean CE. Selected: {selected}")
pd.DataFrame(table)

# %% [markdown]
# ## Tests across seeds (paired by seed) next to the paper's Welch test over pairs

# %%
tests = []
for a in [selected, "joint_l0", "solo_indep1"]:
    if a not in agg.run.values:
        continue
    for m in ["mean_abs_phi", "mse", "delta_ce_pct"]:
        r = paired_by_seed(by_seed, a, "solo", m)
        tests.append({"comparison": f"{a} vs solo", "metric": m, "n_seeds": r["n"], "mean_diff": r["mean_diff"],
                      "se_diff": r["se_diff"], "t": r["t"], "p": r["p"]})
save_table(tests, "tests_across_seeds", ctx.out,
           caption="Paired t-tests across seeds (scipy ttest_rel): the seed is the unit of replication")
pd.DataFrame(tests)

# %% [markdown]
# ## The headline test: the replicated configuration vs solo, paired over seeds
# The configuration is fixed in the profile before any result (the paper's pick), so the
# seeds that test it did not choose it. The minimum detectable effect (MDE) is the true
# Δ mean|φ| this paired t-test would detect with probability 0.8 at α = 0.05, given the
# measured seed-to-seed SD of Δ.

# %%
from scipy import stats

d_phi = []
for s in seed_list:
    r = {x["run"]: x for x in by_seed[s]}
    if selected in r:
        d_phi.append(r[selected]["delta_abs_phi_pct"])
d_phi = np.asarray(d_phi, dtype=float)
n = len(d_phi)
sd = d_phi.std(ddof=1) if n > 1 else float("nan")
mde = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n) if n > 1 else float("nan")
ph = paired_by_seed(by_seed, selected, "solo", "mean_abs_phi")
headline = {"configuration": selected, "n_seeds": n, "delta_abs_phi_pct_mean": d_phi.mean() if n else float("nan"),
            "delta_abs_phi_pct_se": sd / np.sqrt(n) if n > 1 else float("nan"), "sd_between_seeds": sd,
            "p_paired": ph["p"], "t_paired": ph["t"], "mde_pct": mde,
            "delta_l2_pct_mean": float(agg[agg.run == selected].delta_l2_pct_mean.iloc[0]),
            "ce_overhead_pct_joint_mean": float(agg[agg.run == selected].delta_ce_pct_mean.iloc[0]),
            "ce_overhead_pct_solo_mean": float(agg[agg.run == "solo"].delta_ce_pct_mean.iloc[0])}
headline["delta_ce_vs_solo_pp"] = headline["ce_overhead_pct_joint_mean"] - headline["ce_overhead_pct_solo_mean"]
save_table([headline], "headline", ctx.out,
           caption=f"Headline: {selected} vs solo over {n} seeds (mean ± SE of Δ mean|φ| %, paired t-test on mean|φ|, "
                   f"MDE at α = 0.05, power 0.8 from the seed-to-seed SD; CE overhead = (spliced - clean) / clean CE %, "
                   f"and the joint's minus the solo's in percentage points)")
headline

# %% [markdown]
# ## Along training: Δ mean|φ| at 25 / 50 / 100 % of training, over seeds

# %%
snap = pd.DataFrame([{**r, "seed": s} for s in seed_list for r in pipeline.snapshot_phi(ctx, s, progress=False)])
if len(snap):
    piv = snap.pivot_table(index=["seed", "frac"], columns="run", values="mean_abs_phi").reset_index()
    piv["delta"] = 100 * (piv[selected] / piv["solo"] - 1)
    along = piv.groupby("frac").delta.agg(["mean", "sem", "count"]).reset_index()
    along.columns = ["fraction_of_training", "delta_abs_phi_pct_mean", "delta_abs_phi_pct_se", "n_seeds"]
    save_table(along, "phi_along_training_seeds", ctx.out,
               caption=f"Δ mean|φ| % ({selected} vs solo) at training snapshots, mean ± SE over seeds")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for s_, g in piv.groupby("seed"):
        ax.plot(g.frac, g.delta, color="0.7", lw=0.8, marker=".")
    ax.errorbar(along.fraction_of_training, along.delta_abs_phi_pct_mean, yerr=along.delta_abs_phi_pct_se.fillna(0),
                color="k", marker="o", capsize=3, label=f"mean ± SE (n = {len(seed_list)})")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("fraction of training")
    ax.set_ylabel("Δ mean |φ| (%) vs solo")
    ax.set_title("Δ mean|φ| along training (grey: single seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, "phi_along_training", ctx.figures,
                caption=f"Delta mean|phi| of {selected} vs solo along training, per seed and mean ± SE")
    display(along)

# %% [markdown]
# ## Figure 1a over seeds: density of |φ|, solo and the replicated joint, and their difference
# Mean over seeds with a ± SE band; the difference is taken seed by seed.

# %%
phi_by_run = {run: [pipeline.load_phi_summary(ctx, s, run) for s in seed_list] for run in ("solo", selected)}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
plot_phi_density(axes[0], phi_by_run)
plot_phi_density_diff(axes[1], phi_by_run, selected)
fig.suptitle(f"Figure 1a over seeds {seed_list}: |φ| over pairs of alive latents, {selected} vs solo, "
             f"on {phi_by_run['solo'][0].n_tokens:,} tokens per seed")
fig.tight_layout()
save_figure(fig, "fig1a_phi_density_seeds", ctx.figures,
            caption=f"Figure 1a over seeds {seed_list}: density of pairwise |phi| per decade (log |phi| axis), solo and "
                    f"{selected}, and joint minus solo paired by seed; mean ± SE band over n = {len(seed_list)} seeds")

# %% [markdown]
# ## Figure: Δ|φ| and ΔL2 per configuration with seed error bars (Figure 1b over seeds)
# The grid and the baselines may be trained on fewer seeds than the replicated
# configuration (`grid.full_seeds` in the profile); a point from fewer seeds carries its n.

# %%
g = agg[agg.role.isin(["grid", "control", "meta_size", "ortho", "independent_solo"])]
fig, ax = plt.subplots(figsize=(6.5, 4.5))
markers = {"grid": "o", "control": "x", "meta_size": "s", "ortho": "^", "independent_solo": "D"}
for role, gg in g.groupby("role"):
    ax.errorbar(gg.delta_l2_pct_mean, gg.delta_abs_phi_pct_mean,
                xerr=gg.delta_l2_pct_se.fillna(0), yerr=gg.delta_abs_phi_pct_se.fillna(0),
                fmt=markers.get(role, "o"), label=role, capsize=2, ms=5)
    for r in gg.itertuples():
        n_note = "" if r.n_seeds == len(seed_list) else f" (n = {r.n_seeds})"
        ax.annotate(r.run.replace("joint_", "") + n_note, (r.delta_l2_pct_mean, r.delta_abs_phi_pct_mean),
                    fontsize=6, xytext=(3, 2), textcoords="offset points")
ax.axhline(0, color="k", lw=0.5)
ax.axvline(0, color="k", lw=0.5)
ax.set_xlabel("Δ L2 (%) vs solo, mean ± SE")
ax.set_ylabel("Δ mean |φ| (%) vs solo, mean ± SE")
ax.set_title(f"All SAEs over seeds (n = {len(seed_list)} seeds unless marked)")
ax.legend(fontsize=7)
save_figure(fig, "fig1b_seeds_all_saes", ctx.figures,
            caption=f"Delta mean|phi| vs Delta L2 with seed error bars: grid, lambda2=0 control, meta-size ablation, "
                    f"orthogonality baseline, independent solo (n = {len(seed_list)} seeds unless marked)")

# %% [markdown]
# ## Baselines and ablations
# * **independent solo**: how far |φ| moves between two solos that differ only in init seed;
# * **orthogonality baseline** (OrtSAE-style) at the reconstruction cost closest to the selected configuration;
# * **meta size**: the selected (λ₂, σ²) with other meta dictionary sizes m.

# %%
sel_row = agg[agg.run == selected].iloc[0]
rows_flat = [dict(r) for _, r in agg.iterrows()]
orth = matched_reconstruction(rows_flat, sel_row.delta_l2_pct_mean, "ortho", metric="delta_l2_pct_mean")
base = [{"baseline": "selected joint", "run": selected, "delta_abs_phi_pct": sel_row.delta_abs_phi_pct_mean,
         "se": sel_row.delta_abs_phi_pct_se, "delta_l2_pct": sel_row.delta_l2_pct_mean}]
if orth is not None:
    base.append({"baseline": "orthogonality at matched L2", "run": orth["run"],
                 "delta_abs_phi_pct": orth["delta_abs_phi_pct_mean"], "se": orth["delta_abs_phi_pct_se"],
                 "delta_l2_pct": orth["delta_l2_pct_mean"]})
for r in agg[agg.role.isin(["independent_solo", "control"])].itertuples():
    base.append({"baseline": r.role, "run": r.run, "delta_abs_phi_pct": r.delta_abs_phi_pct_mean,
                 "se": r.delta_abs_phi_pct_se, "delta_l2_pct": r.delta_l2_pct_mean})
save_table(base, "baselines", ctx.out,
           caption="Selected joint SAE vs baselines (mean over seeds, se): independent solo = seed noise; "
                   "lambda2=0 control; OrtSAE-style penalty at the closest reconstruction cost")
ms = agg[(agg.role == "meta_size") | (agg.run == selected)].sort_values("meta_latents")
save_table(ms[["run", "meta_latents", "delta_abs_phi_pct_mean", "delta_abs_phi_pct_se", "delta_l2_pct_mean",
               "delta_l2_pct_se", "n_seeds"]], "meta_size_ablation", ctx.out,
           caption=f"Meta-size ablation at lambda2={ctx.profile.grid.ablation_lambda2}, "
                   f"sigma2={ctx.profile.grid.ablation_sigma2} (selected: {selected})")
pd.DataFrame(base)

# %% [markdown]
# ## Convergence curves over seeds

# %%
hist = []
for s in seed_list:
    tr = pipeline.train_seed(ctx, s, progress=False)
    for row in pipeline.history_rows({k: v for k, v in tr.items() if k in ("solo", selected)}):
        hist.append({**row, "seed": s})
hist = pd.DataFrame(hist)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for nm, gg in hist.groupby("run"):
    st = gg.groupby("tokens").agg(mse=("mse", "mean"), se=("mse", "sem"), pen=("penalty", "mean"))
    axes[0].plot(st.index, st.mse, label=nm)
    axes[0].fill_between(st.index, st.mse - st.se.fillna(0), st.mse + st.se.fillna(0), alpha=0.3)
    if st.pen.notna().any():
        axes[1].plot(st.index, st.pen, label=nm)
axes[0].set_yscale("log")
axes[0].set_title(f"MSE vs training tokens (mean ± SE, n = {len(seed_list)} seeds)")
axes[1].set_title(f"mean penalty vs training tokens (mean, n = {len(seed_list)} seeds)")
for ax in axes:
    format_tokens_axis(ax)
    ax.legend(fontsize=7)
fig.tight_layout()
save_figure(fig, "convergence_seeds", ctx.figures,
            caption=f"Convergence curves over seeds {seed_list}: solo and {selected}")

# %% [markdown]
# ## Figure 2 over every seed's pairs
# The matched pairs of every seed with autointerp, pooled: per score the mean of the solo and the
# joint latents (95% t CI over pairs), each beside its random-explanation baseline (hatched). The
# table gives the paired test over the pooled pairs and, with the seed as the unit of replication,
# the mean of the seeds' differences with its SE and one-sample t test.

# %%
from metasae.autointerp.run import pooled_pairs, summarize_pooled

pooled = pooled_pairs(ctx.out, seed_list)
if pooled is not None:
    pj, ps = pooled["records_joint"], pooled["records_solo"]
    stats = summarize_pooled(pooled)
    by_pair, over, vs_rand = stats["joint_vs_solo"], stats["over_seeds"] or {}, stats["vs_random"]
    pooled_rows = [{"score": k, "n_pairs": v["n_pairs"], "mean_solo": v["mean_solo"], "mean_joint": v["mean_joint"],
                    "delta": v["delta"], "p_pairs": v["p"], "mde_pairs": v["mde"],
                    "n_seeds": over.get(k, {}).get("n_seeds"), "delta_over_seeds": over.get(k, {}).get("delta"),
                    "se_over_seeds": over.get(k, {}).get("se"), "p_over_seeds": over.get(k, {}).get("p"),
                    "solo_real_minus_random": vs_rand.get(k, {}).get("diff"),
                    "solo_real_minus_random_ci": [None if x is None else round(x, 4) for x in
                                                  (vs_rand.get(k, {}).get("ci_low"), vs_rand.get(k, {}).get("ci_high"))]}
                   for k, v in by_pair.items()]
    joints = sorted(set(pooled["joint"].values()))
    save_table(pooled_rows, "autointerp_pooled", ctx.out,
               caption=f"Autointerp, {', '.join(joints)} vs solo over the matched pairs of seeds {pooled['seeds']} "
                       f"pooled ({pooled['n_pairs_scored']} with every scorer, {pooled['n_pairs_embedding_only']} "
                       "more with the embedding scorer alone): paired t over pairs (p_pairs, MDE), the seeds' "
                       "mean differences (mean ± SE, one-sample t: p_over_seeds), and the solo latents' real minus "
                       "random-explanation score (95% t CI)")
    display(pd.DataFrame(pooled_rows))
    bar_rows = [{"scorer": k, "joint": [r["scores"].get(k) for r in pj], "solo": [r["scores"].get(k) for r in ps],
                 "joint_random": [r.get("random_scores", {}).get(k) for r in pj],
                 "solo_random": [r.get("random_scores", {}).get(k) for r in ps]} for k in by_pair]
    fig, ax = plt.subplots(figsize=(1.6 * len(bar_rows) + 2, 3.6))
    ns = plot_autointerp_bars(ax, bar_rows)
    ax.set_title(f"Figure 2, seeds {pooled['seeds']} pooled: {', '.join(joints)} vs solo over matched pairs")
    fig.tight_layout()
    save_figure(fig, "fig2_autointerp_pooled", ctx.figures,
                caption=f"Figure 2 over seeds {pooled['seeds']}: mean autointerp score of joint and solo latents over "
                        "the matched pairs of every seed (95% t CI over pairs), each beside its random-explanation "
                        f"baseline (hatched); n pairs per score: {dict(zip(by_pair, ns))}")
