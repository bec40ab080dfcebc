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
# # 4. Qualitative splitting: cross-φ between solo and joint latents
#
# The paper's qualitative claim: a solo latent firing on a polysemous token splits
# into several joint latents, one sense each ("too", "let" on GPT-2 L). Candidates
# are found automatically (SPEC §3.8): solo latents firing on ≤ 5% of tokens, ranked
# by their *second-highest* cross-φ to joint latents, latents dominated by one
# non-alphanumeric token removed. The same ranking against an **independent solo**
# (another init seed, no penalty) shows what seed noise alone produces.

# %% tags=["parameters"]
profile = "smoke"
seeds = "0"
out_dir = ""
figures_dir = ""

# %%
import html

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import HTML, display

from metasae import pipeline
from metasae.autointerp.contexts import example_text
from metasae.metrics.cooccurrence import topk_cross_phi
from metasae.metrics.splitting import merging_candidates, splitting_candidates
from metasae.report import save_figure, save_table

ctx = pipeline.open_run(profile, out_dir, figures_dir, seeds)
seed = ctx.profile.seeds[0]
selected = pipeline.selected_config(ctx, seed)
lm = pipeline.loaded_model(ctx)
rates = {nm: pipeline.load_firing_rates(ctx, seed, nm) for nm in ("solo", selected, "solo_indep1")}
tok, frac = pipeline.dominant_tokens(ctx, seed, "solo", lm.tokenizer)

# %%
cc = pipeline.cross_counts(ctx, seed, "solo", selected)
cands = splitting_candidates(topk_cross_phi(cc, 5), rates["solo"], tok, frac, top=20)
merges = merging_candidates(topk_cross_phi(cc.transposed(), 5), rates[selected], top=20)
split_rows = [{"parent": c["parent"], "rate": c["firing_rate"], "phi_top1": c["phi_top1"], "phi_top2": c["phi_top2"],
               "dominant_token": c.get("dominant_token"),
               "children": ", ".join(f"{ch['child']} ({ch['phi']:.2f})" for ch in c["children"][:3])}
              for c in cands]
save_table(split_rows, f"splitting_candidates_seed{seed}", ctx.out,
           caption=f"Splitting candidates: solo latents (rate <= 5%) ranked by 2nd-highest cross-phi to {selected}")
save_table([{"parent": c["parent"], "phi_top1": c["phi_top1"], "phi_top2": c["phi_top2"],
             "children": ", ".join(f"{ch['child']} ({ch['phi']:.2f})" for ch in c["children"][:3])} for c in merges],
           f"merging_candidates_seed{seed}", ctx.out,
           caption=f"Merging candidates: joint latents of {selected} ranked by 2nd-highest cross-phi to solo latents")
pd.DataFrame(split_rows)

# %% [markdown]
# ## Case studies: parent and children, with explanations, scores and top contexts

# %%
from metasae.autointerp.llm import make_client
from metasae.autointerp.run import score_latents
from metasae import paths

n_cases = 2 if ctx.profile.name == "smoke" else 3
cases = [c for c in cands if len(c["children"]) >= 2][:n_cases]
cache = pipeline.ensure_activations(ctx, progress=False)
client = make_client(ctx.profile.autointerp, cache_dir=ctx.out / "llm_cache")
adir = paths.seed_dir(ctx.out, seed) / "autointerp_splitting"
case_rows, html_parts = [], []
for c in cases:
    parent, kids = c["parent"], [ch["child"] for ch in c["children"][:3]]
    cp = pipeline._contexts_for(ctx, seed, "solo", [parent], cache, lm.tokenizer)
    ck = pipeline._contexts_for(ctx, seed, selected, kids, cache, lm.tokenizer)
    rp = score_latents("solo", [parent], cp, client, ctx.profile.autointerp, adir, scorers=["simulation"],
                       seed=seed, random_baseline=False, progress=False)[0]
    rk = score_latents(selected, kids, ck, client, ctx.profile.autointerp, adir, scorers=["simulation"],
                       seed=seed, random_baseline=False, progress=False)
    entries = [("solo", parent, rp, cp[parent], 1.0)] + [
        (selected, k, r, ck[k], ch["phi"]) for k, r, ch in zip(kids, rk, c["children"])]
    html_parts.append(f"<h4>Solo latent {parent}</h4><table><tr><th>SAE</th><th>latent</th><th>explanation</th>"
                      f"<th>score</th><th>φ to parent</th><th>top contexts</th></tr>")
    for sae_name, lat, rec, lc, phi in entries:
        exs = (lc.explain[:2] if lc.ok else [])
        top = " / ".join(example_text(e, mark_final=True).replace("|", "/") for e in exs)
        sc = rec["scores"].get("simulation")
        case_rows.append({"parent": parent, "dominant_token": c.get("dominant_token"), "sae": sae_name,
                          "latent": lat, "explanation": rec.get("explanation"), "simulation_score": sc,
                          "cross_phi_to_parent": phi, "top_contexts": top})
        html_parts.append(f"<tr><td>{sae_name}</td><td>{lat}</td><td>{html.escape(str(rec.get('explanation')))}</td>"
                          f"<td>{sc}</td><td>{phi:.3f}</td><td>{html.escape(top)}</td></tr>")
    html_parts.append("</table>")
display(HTML("".join(html_parts) or "<p>No solo latent with two or more children at this size.</p>"))

# %%
save_table(case_rows, f"splitting_cases_seed{seed}", ctx.out,
           caption=f"Splitting case studies ({selected} vs solo, seed {seed}): each solo parent (first row of its "
                   f"group) and its joint children, with explanation, simulation score, cross-phi to the parent "
                   f"(1 for the parent itself) and top contexts (<<firing token>>)")
pd.DataFrame(case_rows)

# %% [markdown]
# ## Summary: 2nd-highest cross-φ, solo→joint vs solo→independent solo

# %%
cc_ind = pipeline.cross_counts(ctx, seed, "solo", "solo_indep1")
t_joint = topk_cross_phi(cc, 2).top2
t_ind = topk_cross_phi(cc_ind, 2).top2
from metasae.report import not_enough_data

low = rates["solo"] <= 0.05
fig, ax = plt.subplots(figsize=(6, 3.6))
bins = np.linspace(0, 1, 41)
v_joint, v_ind = t_joint[low & np.isfinite(t_joint)], t_ind[low & np.isfinite(t_ind)]
n_joint, n_ind = len(v_joint), len(v_ind)
MIN_HIST_LATENTS = 5  # fewer than a handful of latents: no density, only the note
if min(n_joint, n_ind) >= MIN_HIST_LATENTS:
    ax.hist(v_joint, bins=bins, alpha=0.6, density=True, label=f"solo → {selected}: n = {n_joint}")
    ax.hist(v_ind, bins=bins, alpha=0.6, density=True, label=f"solo → independent solo: n = {n_ind}")
    ax.legend(fontsize=8)
else:
    ax.set_xlim(0, 1)
    not_enough_data(ax, min(n_joint, n_ind), MIN_HIST_LATENTS, "solo latents")
ax.set_title(f"n = {n_joint} (→ {selected}) and n = {n_ind} (→ independent solo) solo latents, "
             f"seed {seed}", fontsize=9)
ax.set_xlabel("2nd-highest cross-φ of a solo latent (rate ≤ 5%)")
ax.set_ylabel("density")
save_figure(fig, f"splitting_top2_crossphi_seed{seed}", ctx.figures,
            caption=f"2nd-highest cross-phi of solo latents: to the joint SAE vs to an independent solo (seed noise)")
summary = {"selected": selected, "median_top2_joint": float(np.nanmedian(t_joint[low])),
           "median_top2_indep": float(np.nanmedian(t_ind[low])),
           "frac_top2_gt_0.3_joint": float(np.nanmean(t_joint[low] > 0.3)),
           "frac_top2_gt_0.3_indep": float(np.nanmean(t_ind[low] > 0.3))}
save_table([summary], f"splitting_summary_seed{seed}", ctx.out,
           caption="Splitting vs seed noise: 2nd-highest cross-phi of solo latents (rate <= 5%)")
summary
