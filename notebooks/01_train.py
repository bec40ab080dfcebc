# ---
# jupyter:
#   metasae: per-seed; after 00_activations; prepare train_passes
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
# # 1. Harvest and train: solo, the joint grid, controls and baselines
#
# One pass over the activation cache trains every SAE of this seed (SPEC §1):
# the solo BatchTopK SAE, the joint SAEs of the (λ₂, σ²) grid, the λ₂ = 0 control
# (joint architecture, no penalty), an independent solo with another init seed,
# the meta-size ablation and the OrtSAE-style orthogonality baseline. All of them
# see the same batches in the same order; solo and joint primaries start from
# identical weights. Training curves below double as the convergence check.

# %% tags=["parameters"]
profile = "smoke"
seed = 0
out_dir = ""
figures_dir = ""

# %%
import matplotlib.pyplot as plt
import pandas as pd

from metasae import pipeline
from metasae.report import format_tokens_axis, save_figure, save_table

ctx = pipeline.open_run(profile, out_dir, figures_dir)
cache = pipeline.ensure_activations(ctx)
print({s: cache.n_valid(s) for s in ("train", "calib", "phi", "autointerp")}, "valid tokens per split")

# %%
trained = pipeline.train_seed(ctx, seed)
hist = pd.DataFrame(pipeline.history_rows(trained))
final = hist.sort_values("step").groupby("run").tail(1).set_index("run")
final[["role", "lambda2", "sigma2", "tokens", "mse", "l0", "n_dead", "penalty", "meta_mse", "tokens_per_s"]]

# %%
save_table(final.reset_index()[["run", "role", "kind", "lambda2", "sigma2", "tokens", "mse", "aux", "l0", "n_dead",
                                "penalty", "meta_mse", "threshold", "tokens_per_s"]],
           f"training_final_seed{seed}", ctx.out,
           caption=f"Training: final logged values per SAE (seed {seed}; mse in standardised space, BatchTopK rule)")

# %%
fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
show = hist[hist.role.isin(["solo", "grid", "control"])]
for name, g in show.groupby("run"):
    style = dict(lw=2.2, color="k") if name == "solo" else dict(lw=1, alpha=0.8)
    axes[0].plot(g.tokens, g.mse, label=name, **style)
    axes[1].plot(g.tokens, g.n_dead, **style)
    if g.penalty.notna().any():
        axes[2].plot(g.tokens, g.penalty, label=name, **style)
    if g.meta_mse.notna().any():
        axes[3].plot(g.tokens, g.meta_mse, **style)
for ax, t in zip(axes, ["primary MSE (standardised)", "dead latents (symlog)", "mean penalty  mean_i p_i",
                        "meta-SAE MSE"]):
    ax.set_title(t)
    format_tokens_axis(ax)
axes[0].set_yscale("log")
axes[1].set_yscale("symlog", linthresh=10)  # the first steps' hundreds and the tens left later, on one axis
axes[0].legend(fontsize=6, ncol=2)
fig.suptitle(f"Convergence curves, {ctx.name}, seed {seed} ({int(hist.tokens.max()):,} training tokens)")
fig.tight_layout()
save_figure(fig, f"training_curves_seed{seed}", ctx.figures,
            caption=f"Training curves vs tokens (seed {seed}): MSE, dead latents, decomposability penalty, meta MSE")
