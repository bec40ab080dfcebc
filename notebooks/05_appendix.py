# ---
# jupyter:
#   metasae: after 02_cooccurrence
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
# # 5. Appendix: thresholds, firing rates, |φ| distribution shape, activation norms
#
# For the solo SAE and the selected joint SAE of the first seed (paper App. A–D):
# the EER thresholds (and how many latents needed a fallback), firing-rate
# distributions (is a lower |φ| just rarer firing?), the shape of the |φ|
# distribution over all pairs, and input / reconstruction norms. The raw input
# norm sits next to the standardised-space MSE: the paper compared a standardised
# L2 with a raw norm (App. D), a units mismatch.

# %% tags=["parameters"]
profile = "smoke"
seeds = "0"
out_dir = ""
figures_dir = ""

# %%
import matplotlib.pyplot as plt
import numpy as np

from metasae import pipeline
from metasae.metrics.thresholds import load_eer_thresholds
from metasae.report import plot_phi_density, save_figure, save_table

ctx = pipeline.open_run(profile, out_dir, figures_dir, seeds)
seed = ctx.profile.seeds[0]
selected = pipeline.selected_config(ctx, seed)
ev = pipeline.evaluate_seed(ctx, seed, progress=False)
names = ["solo", selected] + (["joint_l0"] if "joint_l0" in ev else [])

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
rows = []
phi_by_run = {}
for nm in names:
    thr = load_eer_thresholds(pipeline.metrics_dir(ctx, seed) / nm / "thresholds.safetensors")
    th = thr.thresholds_F[np.isfinite(thr.thresholds_F)]
    axes[0].hist(th, bins=50, alpha=0.5, label=f"{nm}: n = {th.size} latents")
    rates = pipeline.load_firing_rates(ctx, seed, nm)
    alive = rates[rates > 0]
    axes[1].hist(np.log10(alive), bins=50, alpha=0.5, label=f"{nm}: n = {alive.size} alive latents")
    s = pipeline.load_phi_summary(ctx, seed, nm)
    phi_by_run[nm] = [s]
    rows.append({"run": nm, **thr.counts_by_fallback(), "eer_range": ev[nm]["eer_max_value"],
                 "median_threshold": float(np.median(th)) if th.size else float("nan"),
                 "alive": int((rates > 0).sum()), "median_log10_rate": float(np.median(np.log10(alive))),
                 "frac_rate_gt_5pct": float((rates > 0.05).mean()),
                 "mean_abs_phi": s.mean_abs_phi, "median_abs_phi": s.hist_abs_full.quantile(0.5),
                 "q99_abs_phi": s.hist_abs_full.quantile(0.99), "frac_negative_phi": s.frac_negative,
                 "mean_norm_x": ev[nm]["mean_norm_x"], "mean_norm_x_hat": ev[nm]["mean_norm_x_hat"],
                 "mse_standardised": ev[nm]["mse"], "explained_variance": ev[nm]["explained_variance"]})
plot_phi_density(axes[2], phi_by_run)  # log |phi|, four bins per decade; legend states n pairs
axes[0].set_title(f"EER thresholds (finite), seed {seed}")
axes[0].set_xlabel("threshold")
axes[1].set_title(f"log10 firing rate (alive latents), seed {seed}")
axes[1].set_xlabel("log10 firing rate")
axes[2].set_title(f"|φ| density over all pairs, seed {seed}")
for ax in axes[:2]:
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
fig.tight_layout()
save_figure(fig, "appendix_thresholds_rates_phi", ctx.figures,
            caption=f"Appendix (seed {seed}): EER thresholds, firing-rate distributions, |phi| distribution shape")
save_table(rows, "appendix_stats", ctx.out,
           caption=f"Appendix (seed {seed}): EER fallbacks (eer/rare/dead), threshold range, firing rates, |phi| "
                   f"quantiles, input and reconstruction norms (raw space) next to the standardised MSE")
rows
