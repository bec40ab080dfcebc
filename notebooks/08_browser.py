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
# # 8. Feature browser: read the latents behind the scores
#
# "More atomic" is judged by reading latents. This notebook writes a static site
# under `<out_dir>/browser/` (open `index.html` from disk: no server, no network):
# an index of the Hungarian-matched (joint, solo) pairs that autointerp scored
# (notebook 03) and of the splitting cases (notebook 04), sortable and filterable,
# and one page per pair or case with, side by side, the top-activating contexts
# (firing tokens shaded by activation; hover for the value), contexts sampled from
# lower activation quintiles, an activation histogram, the explanation, every
# autointerp score with its random-explanation baseline, and the decoder cosine and
# cross-φ between a parent and its children. Everything shown comes from the run's
# artefacts or is computed here (`metasae.browser`); a piece the run lacks is
# shown as *missing*.

# %% tags=["parameters"]
profile = "smoke"
seeds = "0"
out_dir = ""
figures_dir = ""

# %%
import time

from IPython.display import HTML, display

from metasae import pipeline
from metasae.browser import build_browser

ctx = pipeline.open_run(profile, out_dir, figures_dir, seeds)
t0 = time.time()
site = build_browser(ctx, ctx.profile.seeds)
print(f"seeds {site['seeds']}: {site['n_pairs']} pairs, {site['n_splits']} splitting cases, "
      f"{site['bytes'] / 1e6:.2f} MB of HTML in {time.time() - t0:.1f} s -> {site['index']}")
assert site["index"].is_file()
display(HTML(f'<a href="{site["index"].resolve().as_uri()}">{site["index"]}</a>'))
