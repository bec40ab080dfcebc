"""A static feature browser: read the latents whose scores the paper compares.

"More atomic" is judged, in the end, by reading latents.  This module writes a
small static site under ``<out>/browser/`` that puts each Hungarian-matched
(joint, solo) pair and each splitting case (a solo parent and its joint
children, SPEC 3.8) side by side: top-activating contexts with the firing tokens
shaded by activation, contexts sampled from lower activation quintiles, an
activation histogram, the explanation and every autointerp score with its
random-explanation baseline, and the decoder cosine / cross-phi that relate the
latents.

It is split in two so the tests need no model:

* :func:`write_site` turns plain data (:class:`PairView`, :class:`SplitView`,
  :class:`LatentView`) into HTML; it computes nothing and reads no file;
* :func:`collect_run` reads one seed of a finished run (autointerp records,
  pair / splitting tables, cross counts, checkpoints, the activation cache) and
  builds those views, reusing :mod:`metasae.autointerp.contexts` for the windows.

The site works from ``file://``: every page is self-contained (CSS and a few
lines of vanilla JS inline, the histogram drawn as SVG by Python), nothing is
fetched and nothing is computed in the browser except sorting and filtering the
index.  Every string that comes from data goes through :func:`html.escape`
(contexts are arbitrary text and may hold ``<script>``).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from metasae.io import apt_install, atomic_write_text

MISSING = "missing"
"""What a cell shows when the artefact it comes from does not exist (e.g. a seed without autointerp)."""

SCORE_ORDER = ("simulation", "fuzz", "fuzz_auc", "detection", "detection_auc")


# ---------------------------------------------------------------------------
# Plain data the site is built from
# ---------------------------------------------------------------------------


@dataclass
class Context:
    """One window of tokens and the latent's activation on each (0 where it does not fire)."""

    tokens: list[str]
    acts: list[float]
    activation: float
    """Activation at the window's last token, the firing token the window was chosen for."""


@dataclass
class LatentView:
    """Everything shown about one latent; ``None`` fields are shown as missing."""

    sae: str
    latent: int
    explanation: str | None = None
    scores: dict[str, float | None] | None = None
    """Autointerp scores (None inside: the scorer ran but gave no score); None: no autointerp record."""
    random_scores: dict[str, float | None] | None = None
    random_explanation: str | None = None
    judge: str | None = None
    top: list[Context] = field(default_factory=list)
    quantiles: list[tuple[str, list[Context]]] = field(default_factory=list)
    """(label, contexts) sampled from lower activation quintiles, highest first."""
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)
    n_firings: int | None = None
    firing_rate: float | None = None
    note: str = ""
    """Why something is absent (e.g. too few firings for contexts), shown under the header."""


@dataclass
class PairView:
    """A Hungarian-matched pair (SPEC 3.6): the joint latent and the solo latent it was matched to."""

    seed: int
    joint: LatentView
    solo: LatentView
    cosine: float | None = None

    @property
    def key(self) -> str:
        return f"pair_seed{self.seed}_{_slug(self.joint.sae)}_{self.joint.latent}_solo_{self.solo.latent}"


@dataclass
class SplitView:
    """A splitting case (SPEC 3.8): a solo parent and the joint children it co-fires with.

    ``phi[i]`` is the cross-phi and ``cosine[i]`` the decoder cosine between the
    parent and ``children[i]``; ``child_cosine`` the decoder cosines among the children.
    """

    seed: int
    parent: LatentView
    children: list[LatentView]
    phi: list[float | None]
    cosine: list[float | None]
    child_cosine: list[list[float | None]] | None = None
    dominant_token: str | None = None

    @property
    def key(self) -> str:
        return f"split_seed{self.seed}_solo_{self.parent.latent}"


# ---------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------


def esc(x: Any) -> str:
    """Escape anything for HTML text and attribute values (quotes included)."""
    return html.escape(str(x), quote=True)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", s)


def _num(x: Any) -> float | None:
    """A finite float, or None (None, nan, '' and unparsable values are all 'no number')."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 3, absent: str = MISSING) -> str:
    """A number cell's text; ``absent`` where there is no number."""
    v = _num(x)
    return absent if v is None else f"{v:.{digits}f}"


def score_cell(scores: dict[str, Any] | None, name: str) -> str:
    """One score as a table cell: missing (no record), n/a (scorer gave none) or the value."""
    if scores is None or name not in scores:
        return f'<td class="missing" data-v="">{MISSING}</td>'
    v = _num(scores[name])
    if v is None:
        return '<td class="na" data-v="" title="the scorer returned no score (e.g. unparsable judge answer)">n/a</td>'
    return f'<td class="num" data-v="{v:.6g}">{v:.3f}</td>'


def num_cell(x: Any, digits: int = 3) -> str:
    v = _num(x)
    if v is None:
        return f'<td class="missing" data-v="">{MISSING}</td>'
    return f'<td class="num" data-v="{v:.6g}">{v:.{digits}f}</td>'


def text_cell(x: Any, limit: int = 90) -> str:
    if x is None:
        return f'<td class="missing">{MISSING}</td>'
    s = str(x)
    short = s if len(s) <= limit else s[:limit - 1] + "…"
    return f'<td class="text" title="{esc(s)}">{esc(short)}</td>'


def _visible(tok: str) -> str:
    """Newlines and tabs made visible, so a context stays on one readable line."""
    return tok.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def context_html(ctx: Context, scale: float) -> str:
    """A window as spans: firing tokens shaded by activation / ``scale``; the value in the title (hover)."""
    parts = []
    last = len(ctx.tokens) - 1
    for i, (tok, a) in enumerate(zip(ctx.tokens, ctx.acts)):
        t = esc(_visible(tok))
        a = float(a)
        cls = ' class="end"' if i == last else ""
        if a > 0:
            alpha = min(1.0, max(0.08, a / scale)) if scale > 0 else 1.0
            parts.append(f'<span{cls} style="background:rgba(255,120,0,{alpha:.2f})" title="{a:.3f}">{t}</span>')
        else:
            parts.append(f"<span{cls}>{t}</span>" if cls else t)
    return f'<div class="ctx" title="activation at the last token: {float(ctx.activation):.3f}">{"".join(parts)}</div>'


def histogram_svg(counts: Sequence[int], edges: Sequence[float], width: int = 280, height: int = 80) -> str:
    """Activation histogram as inline SVG (bars with a hover title, min / max / n under the axis)."""
    if not len(counts) or sum(counts) == 0:
        return f'<p class="missing">histogram {MISSING}: no firings</p>'
    top = max(counts)
    pad_b, pad_t = 18, 4
    h = height - pad_b - pad_t
    bw = width / len(counts)
    bars = []
    for i, c in enumerate(counts):
        bh = 0 if top == 0 else h * c / top
        bars.append(f'<rect x="{i * bw:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                    f'height="{bh:.1f}"><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}</title></rect>')
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'xmlns="http://www.w3.org/2000/svg" role="img"><g fill="#d9730d">{"".join(bars)}</g>'
            f'<line x1="0" y1="{pad_t + h}" x2="{width}" y2="{pad_t + h}" stroke="#555"/>'
            f'<text x="0" y="{height - 4}" font-size="10">{edges[0]:.3g}</text>'
            f'<text x="{width / 2}" y="{height - 4}" font-size="10" text-anchor="middle">n = {sum(counts)}, '
            f'max bar {top}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text></svg>')


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:18px 0 6px}h3{font-size:15px;margin:0 0 4px}
h4{font-size:13px;margin:10px 0 3px;color:#444}
table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}
th{background:#f3f3f3;text-align:left}th.sort{cursor:pointer;user-select:none}
th.sort:after{content:" \\2195";color:#999}
td.num{text-align:right;font-variant-numeric:tabular-nums}.missing{color:#999;font-style:italic}
.na{color:#a60;font-style:italic}
.cols{display:grid;grid-auto-flow:column;grid-auto-columns:minmax(300px,1fr);gap:12px;overflow-x:auto}
.col{border:1px solid #ddd;border-radius:4px;padding:8px;min-width:0}
.ctx{font:12px/1.5 ui-monospace,monospace;white-space:pre-wrap;word-break:break-word;border-bottom:1px solid #eee;
padding:2px 0}.ctx span{white-space:pre}.ctx .end{outline:1px solid #555}
.expl{background:#f7f7ff;padding:4px;border-left:3px solid #88a}.note{color:#a60}
input{font:inherit;padding:2px 4px;width:320px}.small{font-size:12px;color:#555}
td.text{min-width:220px;max-width:340px}table.scores{width:100%;font-size:13px}
"""

INDEX_JS = """
(function(){
  var tables=document.querySelectorAll('table.sortable');
  function val(td){var v=td.getAttribute('data-v');if(v===null)return td.textContent.toLowerCase();
    return v===''?null:parseFloat(v);}
  tables.forEach(function(t){
    var body=t.tBodies[0];
    t.querySelectorAll('th.sort').forEach(function(th,i){
      th.addEventListener('click',function(){
        var asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
        var col=th.cellIndex;var rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(a,b){var x=val(a.cells[col]),y=val(b.cells[col]);
          if(x===null&&y===null)return 0;if(x===null)return 1;if(y===null)return -1;
          return (x<y?-1:x>y?1:0)*(asc?1:-1);});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
    var box=document.querySelector('input[data-for="'+t.id+'"]');
    function filter(){var q=box?box.value.toLowerCase():'';var n=0;
      Array.prototype.forEach.call(body.rows,function(r){
        var show=!q||r.textContent.toLowerCase().indexOf(q)>=0;r.style.display=show?'':'none';if(show)n++;});
      t.setAttribute('data-visible',String(n));}
    if(box)box.addEventListener('input',filter);
    filter();
    t.setAttribute('data-ready','1');
  });
  document.body.setAttribute('data-ready','1');
})();
"""


def _page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}{js}</body></html>\n")


# ---------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------


def score_names(views: Iterable[LatentView]) -> list[str]:
    """Score names present in any view, the paper's scorers first."""
    seen: set[str] = set()
    for v in views:
        seen |= set(v.scores or {}) | set(v.random_scores or {})
    return [s for s in SCORE_ORDER if s in seen] + sorted(seen - set(SCORE_ORDER))


def latent_column(v: LatentView, scorers: Sequence[str], relation: list[tuple[str, Any]] | None = None) -> str:
    """One latent's column on a pair / split page."""
    out = [f'<div class="col" data-latent="{v.latent}"><h3>{esc(v.sae)} latent {v.latent}</h3>',
           f'<div class="small">firing rate {fmt(v.firing_rate, 5)} (phi split); '
           f'{MISSING if v.n_firings is None else v.n_firings} firings on the autointerp split</div>']
    if v.note:
        out.append(f'<div class="note">{esc(v.note)}</div>')
    if relation:
        out.append("<table><tbody>" + "".join(f"<tr><th>{esc(k)}</th>{num_cell(x)}</tr>" for k, x in relation)
                   + "</tbody></table>")
    out.append("<h4>Explanation</h4>")
    out.append(f'<div class="expl">{esc(v.explanation)}</div>' if v.explanation is not None
               else f'<div class="expl missing">{MISSING}</div>')
    judge = f" (judge {esc(v.judge)})" if v.judge else ""
    out.append(f"<h4>Autointerp scores{judge}</h4><table class=\"scores\"><thead><tr><th>scorer</th><th>score</th>"
               f"<th>random expl.</th></tr></thead><tbody>")
    for s in scorers:
        out.append(f"<tr><th>{esc(s)}</th>{score_cell(v.scores, s)}{score_cell(v.random_scores, s)}</tr>")
    out.append("</tbody></table>")
    if v.random_explanation is not None:
        out.append(f'<div class="small">random explanation: {esc(v.random_explanation)}</div>')
    out.append("<h4>Activation histogram (firings, autointerp split)</h4>")
    out.append(histogram_svg(v.hist_counts, v.hist_edges))
    scale = max([c.activation for c in v.top] + [max(c.acts, default=0.0) for c in v.top] + [0.0])
    out.append("<h4>Top-activating contexts</h4>")
    out.append("".join(context_html(c, scale) for c in v.top) if v.top
               else f'<p class="missing">contexts {MISSING}</p>')
    for label, cs in v.quantiles:
        out.append(f"<h4>{esc(label)}</h4>" + "".join(context_html(c, scale) for c in cs))
    out.append("</div>")
    return "".join(out)


def pair_page(p: PairView, scorers: Sequence[str]) -> str:
    body = (f'<p><a href="../index.html">&larr; index</a></p><h1>Seed {p.seed}: joint {esc(p.joint.sae)} latent '
            f'{p.joint.latent} &harr; solo latent {p.solo.latent}</h1>'
            f'<p>Hungarian-matched on decoder cosine: <b>{fmt(p.cosine)}</b>. Shading: activation relative to the '
            f'latent\'s top context; hover a token for its value; the outlined token is the one the window ends on.</p>'
            f'<div class="cols">{latent_column(p.joint, scorers)}{latent_column(p.solo, scorers)}</div>')
    return _page(f"pair {p.joint.latent} / {p.solo.latent}", body)


def split_page(s: SplitView, scorers: Sequence[str]) -> str:
    names = [f"{c.sae} {c.latent}" for c in s.children]
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rel = (f"<table><thead><tr><th></th>{head}</tr></thead><tbody>"
           f"<tr><th>cross-phi to parent</th>{''.join(num_cell(x) for x in s.phi)}</tr>"
           f"<tr><th>decoder cosine to parent</th>{''.join(num_cell(x) for x in s.cosine)}</tr>")
    for i, row in enumerate(s.child_cosine or []):
        rel += f"<tr><th>decoder cosine to {esc(names[i])}</th>{''.join(num_cell(x) for x in row)}</tr>"
    rel += "</tbody></table>"
    dom = f" (dominant token <code>{esc(repr(s.dominant_token))}</code>)" if s.dominant_token is not None else ""
    cols = latent_column(s.parent, scorers) + "".join(
        latent_column(c, scorers, [("cross-phi to parent", f), ("decoder cosine to parent", k)])
        for c, f, k in zip(s.children, s.phi, s.cosine))
    body = (f'<p><a href="../index.html">&larr; index</a></p><h1>Seed {s.seed}: solo latent {s.parent.latent}'
            f'{dom} and its joint children</h1><p>Children: the joint latents with the highest cross-phi to the '
            f'parent (co-firing on the phi split).</p>{rel}<div class="cols">{cols}</div>')
    return _page(f"split {s.parent.latent}", body)


def _mean(xs: Iterable[Any]) -> float | None:
    v = [x for x in (_num(x) for x in xs) if x is not None]
    return sum(v) / len(v) if v else None


def index_page(pairs: Sequence[PairView], splits: Sequence[SplitView], scorers: Sequence[str], title: str) -> str:
    ph = "".join(f'<th class="sort">joint {esc(s)}</th><th class="sort">solo {esc(s)}</th>' for s in scorers)
    prow = []
    for p in pairs:
        cells = "".join(score_cell(p.joint.scores, s) + score_cell(p.solo.scores, s) for s in scorers)
        prow.append(f'<tr><td>{p.seed}</td><td><a href="pages/{esc(p.key)}.html">{p.joint.latent} / {p.solo.latent}'
                    f'</a></td>{num_cell(p.cosine)}{cells}{text_cell(p.joint.explanation)}'
                    f'{text_cell(p.solo.explanation)}</tr>')
    sh = "".join(f'<th class="sort">parent {esc(s)}</th><th class="sort">children mean {esc(s)}</th>'
                 for s in scorers)
    srow = []
    for c in splits:
        phis = sorted((x for x in (_num(f) for f in c.phi) if x is not None), reverse=True)
        cells = "".join(score_cell(c.parent.scores, s) + num_cell(
            _mean((k.scores or {}).get(s) for k in c.children)) for s in scorers)
        kids = ", ".join(f"{k.latent}" for k in c.children)
        srow.append(f'<tr><td>{c.seed}</td><td><a href="pages/{esc(c.key)}.html">{c.parent.latent}</a></td>'
                    f'{text_cell(c.dominant_token)}<td>{esc(kids)}</td>{num_cell(phis[0] if phis else None)}'
                    f'{num_cell(phis[1] if len(phis) > 1 else None)}{num_cell(_mean(c.cosine))}{cells}'
                    f'{text_cell(c.parent.explanation)}</tr>')
    empty = '<p class="missing">{} {}</p>'
    body = (f"<h1>{esc(title)}</h1><p class=\"small\">Click a column header to sort, type to filter. "
            f"<i>missing</i>: the run has no such artefact; <i>n/a</i>: the scorer gave no score.</p>"
            f"<h2>Matched pairs (joint vs solo)</h2>"
            f'<input data-for="pairs" placeholder="filter pairs (latent, explanation, ...)">'
            f'<table id="pairs" class="sortable"><thead><tr><th class="sort">seed</th><th class="sort">joint / solo'
            f'</th><th class="sort">decoder cosine</th>{ph}<th class="sort">joint explanation</th>'
            f'<th class="sort">solo explanation</th></tr></thead><tbody>{"".join(prow)}</tbody></table>'
            f'{empty.format("matched pairs", MISSING) if not pairs else ""}'
            f"<h2>Splitting cases (solo parent, joint children)</h2>"
            f'<input data-for="splits" placeholder="filter splitting cases">'
            f'<table id="splits" class="sortable"><thead><tr><th class="sort">seed</th><th class="sort">parent</th>'
            f'<th class="sort">dominant token</th><th>children</th><th class="sort">cross-phi top1</th>'
            f'<th class="sort">cross-phi top2</th><th class="sort">mean decoder cosine</th>{sh}'
            f'<th class="sort">parent explanation</th></tr></thead><tbody>{"".join(srow)}</tbody></table>'
            f'{empty.format("splitting cases", MISSING) if not splits else ""}')
    return _page(title, body, INDEX_JS)


def write_site(out_dir: str | Path, pairs: Sequence[PairView], splits: Sequence[SplitView],
               title: str = "Feature browser") -> Path:
    """Write ``index.html`` and ``pages/*.html`` under ``out_dir``; returns the index path.

    Pages of an earlier build that this one no longer has are removed, so the
    index and the folder always agree.
    """
    out = Path(out_dir)
    pages = out / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    scorers = score_names([v for p in pairs for v in (p.joint, p.solo)] +
                          [v for s in splits for v in (s.parent, *s.children)])
    keep = set()
    # a page lists the scorers its own latents were scored with (splitting cases: simulation only)
    for p in pairs:
        atomic_write_text(pages / f"{p.key}.html", pair_page(p, score_names([p.joint, p.solo]) or scorers))
        keep.add(f"{p.key}.html")
    for s in splits:
        atomic_write_text(pages / f"{s.key}.html", split_page(s, score_names([s.parent, *s.children]) or scorers))
        keep.add(f"{s.key}.html")
    for old in pages.glob("*.html"):
        if old.name not in keep:
            old.unlink()
    index = out / "index.html"
    atomic_write_text(index, index_page(pairs, splits, scorers, title))
    return index


def site_bytes(out_dir: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(out_dir).rglob("*.html"))


# ---------------------------------------------------------------------------
# Contexts of one latent (reusing the autointerp context machinery)
# ---------------------------------------------------------------------------


def latent_windows(firings: Any, latent: int, tokens_RT: Any, *, sae: Any, acts_RTD: Any, theta: float,
                   mask_RT: Any, window: int, strings: Any, rng: np.random.Generator, n_top: int = 10,
                   n_per_quintile: int = 3, n_bins: int = 30) -> dict[str, Any]:
    """Top contexts, a few contexts per lower quintile and the activation histogram of one latent.

    Eligibility (a full window ending at the firing token) and quintiles follow
    :func:`metasae.autointerp.contexts.build_latent_contexts`; per-token
    activations come from :func:`~metasae.autointerp.contexts.window_activations`,
    so the shading shows every token where the latent fires, not only the last.
    """
    from metasae.autointerp.contexts import N_QUINTILES, quintiles, window_activations

    rows, pos, vals = firings.of(latent)
    out: dict[str, Any] = {"top": [], "quantiles": [], "hist_counts": [], "hist_edges": [],
                           "n_firings": int(len(rows)), "note": ""}
    if len(vals):
        lo, hi = float(vals.min()), float(vals.max())
        counts, edges = np.histogram(vals, bins=n_bins, range=(lo, hi if hi > lo else lo + 1e-6))
        out["hist_counts"], out["hist_edges"] = [int(c) for c in counts], [float(e) for e in edges]
    elig = np.nonzero(pos >= window - 1)[0]
    if len(elig) == 0:
        out["note"] = f"no firing with a full {window}-token window before it: contexts {MISSING}"
        return out
    tokens = np.asarray(tokens_RT)
    mask = np.asarray(mask_RT).astype(bool)

    def contexts(idx: np.ndarray) -> list[Context]:
        wins = [(int(rows[i]), int(pos[i])) for i in idx]
        wa = window_activations(sae, theta, latent, acts_RTD, mask, wins, window)
        return [Context(tokens=strings(tokens[r, e - window + 1:e + 1]), acts=[float(a) for a in wa[j]],
                        activation=float(vals[i])) for j, ((r, e), i) in enumerate(zip(wins, idx))]

    if len(elig) < N_QUINTILES:
        out["top"] = contexts(elig[np.argsort(-vals[elig], kind="stable")][:n_top])
        out["note"] = f"only {len(elig)} eligible firings: no quintile samples"
        return out
    qs = quintiles(vals[elig])
    out["top"] = contexts(elig[qs[0][:n_top]])
    for q in range(1, N_QUINTILES):
        pick = rng.choice(qs[q], size=min(n_per_quintile, len(qs[q])), replace=False)
        pick = pick[np.argsort(-vals[elig[pick]], kind="stable")]
        label = f"Quintile {q + 1} of 5 ({100 - 20 * (q + 1)}-{100 - 20 * q}th percentile of firings), random sample"
        out["quantiles"].append((label, contexts(elig[pick])))
    return out


# ---------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------


def read_autointerp(folder: Path, latent: int) -> dict[str, Any] | None:
    """The autointerp record of one latent (``latent_XXXXXX.json``), or None when absent."""
    p = Path(folder) / f"latent_{int(latent):06d}.json"
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as fh:
        return json.load(fh)


def apply_record(v: LatentView, rec: dict[str, Any] | None) -> LatentView:
    """Copy explanation, scores, random baseline and judge from an autointerp record into ``v``."""
    if rec is None:
        return v
    v.explanation = rec.get("explanation")
    v.scores = dict(rec.get("scores") or {})
    v.random_scores = dict(rec["random_scores"]) if isinstance(rec.get("random_scores"), dict) else None
    v.random_explanation = rec.get("random_explanation")
    j = rec.get("judge") or {}
    v.judge = " / ".join(str(j[k]) for k in ("backend", "model") if j.get(k)) or None
    if rec.get("skip_reason"):
        v.note = f"autointerp skipped: {rec['skip_reason']}"
    return v


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_pairs(out: Path, seed: int) -> list[dict[str, Any]] | None:
    """The pairs autointerp scored: ``seed<s>/autointerp/summary.json``, else the per-pair table; None if neither."""
    summ = Path(out) / f"seed{seed}" / "autointerp" / "summary.json"
    if summ.is_file():
        with open(summ, encoding="utf-8") as fh:
            return [{"joint": int(p["joint"]), "solo": int(p["solo"]), "cosine": p.get("cosine")}
                    for p in json.load(fh).get("pairs", [])]
    table = Path(out) / "tables" / f"autointerp_pairs_seed{seed}.csv"
    if table.is_file():
        return [{"joint": int(r["joint_latent"]), "solo": int(r["solo_latent"]), "cosine": _num(r.get("cosine"))}
                for r in _read_csv(table)]
    return None


_CHILD = re.compile(r"(\d+)\s*\(")


def read_splits(out: Path, seed: int) -> list[dict[str, Any]] | None:
    """Splitting cases of notebook 04: parent, dominant token, children (case table, else candidate table)."""
    cases = Path(out) / "tables" / f"splitting_cases_seed{seed}.csv"
    if cases.is_file():
        by: dict[int, dict[str, Any]] = {}
        for r in _read_csv(cases):
            par = int(r["parent"])
            d = by.setdefault(par, {"parent": par, "dominant_token": r.get("dominant_token"), "children": [],
                                    "joint": None})
            if r["sae"] != "solo":
                d["children"].append(int(r["latent"]))
                d["joint"] = r["sae"]
        return list(by.values())
    cands = Path(out) / "tables" / f"splitting_candidates_seed{seed}.csv"
    if cands.is_file():
        rows = [r for r in _read_csv(cands) if len(_CHILD.findall(r.get("children", ""))) >= 2]
        return [{"parent": int(r["parent"]), "dominant_token": r.get("dominant_token"),
                 "children": [int(x) for x in _CHILD.findall(r["children"])[:3]], "joint": None} for r in rows[:3]]
    return None


def collect_run(ctx: Any, seed: int, n_top: int = 10, n_per_quintile: int = 3, progress: bool = True,
                max_fallback_pairs: int = 5) -> tuple[list[PairView], list[SplitView]]:
    """Pair and splitting-case views of one seed of a finished run.

    Reads what the earlier notebooks left (autointerp records and summary,
    splitting tables, cross counts, thresholds, firing rates) and recomputes only
    the per-latent windows (one pass of each SAE over the autointerp split, a few
    seconds on the default profile); it writes nothing into the run.  Where autointerp never ran for ``seed``
    the pairs are the first Hungarian matches by cosine, with scores shown missing.
    """
    from metasae import pipeline
    from metasae.autointerp.contexts import TokenStrings, collect_firings
    from metasae.checkpoint import load_trained_run
    from metasae.metrics.cooccurrence import phi_from_counts

    out = ctx.out
    sdir = out / f"seed{seed}"
    joint = pipeline.selected_config(ctx, seed)
    pairs = read_pairs(out, seed)
    splits = read_splits(out, seed) or []
    split_joint = next((s["joint"] for s in splits if s["joint"]), joint)
    root = pipeline.ckpt_root(ctx, seed)
    names = ["solo"] + [n for n in dict.fromkeys([joint, split_joint]) if n != "solo"]
    runs = {nm: load_trained_run(root, nm) for nm in names}
    if pairs is None:
        m = pipeline.matched_pairs(ctx, seed, joint)
        order = np.argsort(-np.asarray(m.cosine), kind="stable")[:max_fallback_pairs]
        pairs = [{"joint": int(m.idx_a[i]), "solo": int(m.idx_b[i]), "cosine": float(m.cosine[i])} for i in order]
    need: dict[str, set[int]] = {nm: set() for nm in names}
    for p in pairs:
        need[joint].add(p["joint"])
        need["solo"].add(p["solo"])
    for s in splits:
        need["solo"].add(s["parent"])
        need[split_joint].update(s["children"])

    cache = pipeline.ensure_activations(ctx, progress=False)
    acts, tokens, mask = cache.split_arrays("autointerp")
    tokens_np, mask_np = tokens.numpy(), mask.numpy()
    strings = TokenStrings(pipeline.loaded_model(ctx).tokenizer)
    window = int(ctx.profile.autointerp.window)
    views: dict[tuple[str, int], LatentView] = {}
    for nm in names:
        if not need[nm]:
            continue
        run = runs[nm]
        thr = pipeline.thresholds_for(ctx, seed, nm, run, cache).thresholds_F
        rates_path = pipeline.metrics_dir(ctx, seed) / nm / "firing_rates.json"
        rates = pipeline.load_firing_rates(ctx, seed, nm) if rates_path.is_file() else None
        if progress:
            print(f"seed {seed}: {nm}: firings of {len(need[nm])} latents on the autointerp split", flush=True)
        fir = collect_firings(run.sae, thr, acts, mask, latents=sorted(need[nm]))
        for lat in sorted(need[nm]):
            w = latent_windows(fir, lat, tokens_np, sae=run.sae, acts_RTD=acts, theta=float(thr[lat]),
                               mask_RT=mask_np, window=window, strings=strings,
                               rng=np.random.default_rng([seed, lat, 29]), n_top=n_top,
                               n_per_quintile=n_per_quintile)
            v = LatentView(sae=nm, latent=lat, top=w["top"], quantiles=w["quantiles"], hist_counts=w["hist_counts"],
                           hist_edges=w["hist_edges"], n_firings=w["n_firings"], note=w["note"],
                           firing_rate=None if rates is None else float(rates[lat]))
            views[(nm, lat)] = v

    def view(nm: str, lat: int, folders: Sequence[str]) -> LatentView:
        base = views[(nm, lat)]
        v = LatentView(**{k: getattr(base, k) for k in base.__dataclass_fields__})
        for f in folders:
            rec = read_autointerp(sdir / f / nm, lat)
            if rec is not None:
                return apply_record(v, rec)
        return v

    pair_views = [PairView(seed, view(joint, p["joint"], ["autointerp"]), view("solo", p["solo"], ["autointerp"]),
                           _num(p.get("cosine"))) for p in pairs]

    split_views = []
    if splits:
        cc = pipeline.cross_counts(ctx, seed, "solo", split_joint)  # cached by notebook 04
        Wp = runs["solo"].sae.W_dec_FD.detach().float().numpy()
        Wc = runs[split_joint].sae.W_dec_FD.detach().float().numpy()
        for s in splits:
            par, kids = s["parent"], s["children"]
            phi = [float(phi_from_counts(cc.N11[par - cc.lo, k], cc.N_a[par], cc.N_b[k], cc.N)) for k in kids]
            cos = [float(Wp[par] @ Wc[k] / (np.linalg.norm(Wp[par]) * np.linalg.norm(Wc[k]))) for k in kids]
            Wk = Wc[kids] / np.linalg.norm(Wc[kids], axis=1, keepdims=True)
            kk = (Wk @ Wk.T).tolist()
            folders = ["autointerp_splitting", "autointerp"]
            kid_views = [view(split_joint, k, folders) for k in kids]
            split_views.append(SplitView(seed, view("solo", par, folders), kid_views,
                                         phi=[_num(x) for x in phi], cosine=cos, child_cosine=kk,
                                         dominant_token=s.get("dominant_token")))
    return pair_views, split_views


def build_browser(ctx: Any, seeds: Sequence[int], site_dir: str | Path | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """The notebook's one call: collect the views of each seed and write ``<out>/browser/`` (or ``site_dir``).

    Seeds with autointerp results are browsed; when none has any (a run without
    autointerp), the first seed is, with its scores shown missing.
    """
    with_ai = [s for s in seeds if read_pairs(ctx.out, s) is not None]
    use = with_ai or list(seeds)[:1]
    pairs: list[PairView] = []
    splits: list[SplitView] = []
    for s in use:
        p, sp = collect_run(ctx, s, progress=progress)
        pairs += p
        splits += sp
    site = Path(site_dir) if site_dir else ctx.out / "browser"
    index = write_site(site, pairs, splits,
                       title=f"Feature browser: profile {ctx.profile.name}, seed(s) {','.join(map(str, use))}")
    return {"index": index, "seeds": use, "n_pairs": len(pairs), "n_splits": len(splits), "bytes": site_bytes(site)}


# ---------------------------------------------------------------------------
# A real browser for the tests (and for screenshots)
# ---------------------------------------------------------------------------


class ChromiumUnavailable(RuntimeError):
    pass


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for n in CHROMIUM_NAMES:
        p = shutil.which(n)
        if p:
            return p
    return None


def ensure_chromium() -> str:
    """Path of a Chromium binary, installing Debian's ``chromium`` package when absent.

    Installed the way the offline corpus packages are (metasae.activations.corpus):
    ``apt-get update`` then ``apt-get install -y chromium``, as root.
    """
    found = find_chromium()
    if found:
        return found
    apt_install(["chromium"], "Chromium (for the browser's tests and screenshots)", ChromiumUnavailable)
    found = find_chromium()
    if not found:
        raise ChromiumUnavailable("`apt-get install -y chromium` succeeded but no chromium binary is on PATH")
    return found


HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                  "--no-first-run", "--disable-dev-shm-usage", "--allow-file-access-from-files")


def headless(path: str | Path, *, dump_dom: bool = False, screenshot: str | Path | None = None,
             window_size: tuple[int, int] = (1280, 900), timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local file: its DOM after scripts ran (stdout) or a screenshot."""
    exe = ensure_chromium()
    args = [exe, *HEADLESS_FLAGS, f"--window-size={window_size[0]},{window_size[1]}"]
    if dump_dom:
        args.append("--dump-dom")
    if screenshot is not None:
        args += ["--hide-scrollbars", f"--screenshot={Path(screenshot).resolve()}"]
    args.append(Path(path).resolve().as_uri())
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "metasae-chromium-home"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def console_errors(stderr: str) -> list[str]:
    """Console lines of a headless run (``--enable-logging=stderr``).

    The pages never log, so every console line is a problem: an uncaught
    exception, a ``console.error`` or a blocked resource.  Chromium prints them
    all as ``INFO:CONSOLE`` whatever their level, so all of them are returned.
    """
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln]


__all__ = ["Context", "LatentView", "PairView", "SplitView", "write_site", "collect_run", "build_browser",
           "latent_windows", "read_autointerp", "read_pairs", "read_splits", "apply_record", "histogram_svg",
           "context_html", "ensure_chromium", "headless", "console_errors", "ChromiumUnavailable", "MISSING"]
