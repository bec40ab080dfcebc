# ---
# jupyter:
#   metasae: after nothing
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
# # 0. Activations: harvest once, and the massive activations
#
# The language model runs once per profile: every split (train, calibration, φ,
# autointerp) is harvested into the activation cache here, before the per-seed
# notebooks (which may run in parallel processes) read it.
#
# Llama-family models write a few **massive activations**: tokens whose residual
# norm is tens to hundreds of times the median, carried in one or two dimensions,
# that act as attention sinks. They hold most of the raw variance, so raw-space
# explained variance says little here, and an SAE that reconstructs them badly can
# dominate the CE cost of splicing it in. This notebook finds them: which tokens,
# at which positions, in which dimensions. `data.massive_norm_ratio` decides their
# treatment (left out of SAE training, passed through unchanged at the splice;
# notebook 02 reports CE both ways).

# %% tags=["parameters"]
profile = "smoke"
seeds = "0"
out_dir = ""
figures_dir = ""

# %%
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch

from metasae import pipeline
from metasae.activations.cache import massive_variance_stats
from metasae.report import save_figure, save_table

ctx = pipeline.open_run(profile, out_dir, figures_dir, seeds)
pipeline.set_threads(ctx)
cache = pipeline.ensure_activations(ctx)
print({s: cache.n_valid(s) for s in ("train", "calib", "phi", "autointerp")}, "valid tokens per split")

# %%
ratio = ctx.profile.data.massive_norm_ratio
norms = cache.token_norms("phi")
ref_split = cache.norm_reference_split()  # "train", or "calib" when the training split is streamed
med = float(np.median(cache.token_norms(ref_split)))
cut = cache.massive_norm(ratio) if ratio else 5.0 * med  # the analysis uses 5x when the setting is off
tokens, mask = cache.tokens("phi"), cache.mask("phi")
tok_valid = tokens[mask].numpy()
pos_valid = torch.arange(tokens.shape[1]).expand_as(tokens)[mask].numpy()
massive = norms > cut
# one pass over the split (a paper profile's phi split does not fit in memory)
var_share, dim_share = massive_variance_stats(cache.valid_acts("phi", 65536), massive)
tokenizer = pipeline.loaded_model(ctx).tokenizer
top_tokens = Counter(tokenizer.decode([int(t)]) for t in tok_valid[massive]).most_common(8)
top_pos = Counter(int(p) for p in pos_valid[massive]).most_common(3)
top_dims = torch.topk(dim_share, 3).indices.tolist() if massive.any() else []
stats = {"split": "phi", "tokens": int(len(norms)), "median_norm": float(np.median(norms)),
         "q99_norm": float(np.quantile(norms, 0.99)), "q999_norm": float(np.quantile(norms, 0.999)),
         "max_norm": float(norms.max()), "cut_norm": cut, "cut_ratio": cut / med,
         "massive_tokens": int(massive.sum()), "massive_frac": float(massive.mean()),
         "massive_raw_variance_share": var_share,
         "massive_top_tokens": ", ".join(f"{t!r}: {c}" for t, c in top_tokens),
         "massive_positions": ", ".join(f"{p}: {c}" for p, c in top_pos),
         "massive_top_dims": ", ".join(str(d) for d in top_dims),
         "treatment": ("left out of training, passed through at the splice" if ratio else "none (kept everywhere)")}
save_table([stats], "massive_activations", ctx.out,
           caption="Massive activations on the phi split: token norms, the tokens above the cut "
                   f"({cut / med:.1f} x the median {ref_split} norm), where they sit and the raw variance they hold")
stats

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].hist(np.log10(norms), bins=80, color="0.3")
axes[0].axvline(np.log10(cut), color="r", lw=1, label=f"cut: {cut / med:.1f} × median")
axes[0].set_yscale("log")
axes[0].set_xlabel("log10 token norm")
axes[0].set_ylabel("tokens")
axes[0].legend(fontsize=8)
axes[0].set_title(f"Token norms, layer {ctx.profile.model.layer} (n = {len(norms):,})")
if massive.any():
    counts = np.bincount(pos_valid[massive], minlength=tokens.shape[1])
    axes[1].bar(np.arange(len(counts)), counts, color="C3")
    axes[1].set_title(f"Positions of the {int(massive.sum())} massive tokens")
else:
    axes[1].text(0.5, 0.5, "no token above the cut", ha="center", va="center", transform=axes[1].transAxes)
    axes[1].set_title("Positions of massive tokens")
axes[1].set_xlabel("position in the context (0 = BOS)")
fig.tight_layout()
save_figure(fig, "massive_activations", ctx.figures,
            caption="Token norm distribution (log scale) with the massive-activation cut, and the positions of "
                    "the tokens above it")
