"""Saving the paper's tables and figures, and recording each one for results.md.

Notebooks save every artefact through two functions:

* ``save_figure(fig, name, figures_dir, caption="")`` writes ``<name>.png`` and
  ``<name>.pdf`` into ``figures_dir``;
* ``save_table(rows_or_dataframe, name, out_dir, caption="")`` writes
  ``<name>.csv`` and ``<name>.md`` into ``<out_dir>/tables/``.

Both write atomically (``metasae.io``) and append an entry (name, kind, paths,
caption, producing notebook, seed(s)) to the artefact index that
``metasae.harness`` turns into ``results.md``.  Under the harness the index is
``$METASAE_ARTIFACT_INDEX`` and the notebook / seed come from
``$METASAE_NOTEBOOK``, ``$METASAE_SEED`` and ``$METASAE_SEEDS``; run by hand, a
table is indexed in ``<out_dir>/artifacts.jsonl`` and a figure in
``<figures_dir>/artifacts.jsonl``.

Figures that need more than a plain ``ax.plot`` are drawn with the plotting
helpers below (Figure 1a's |phi| density on a log axis, Figure 2's score
densities, token axes, the 'not enough data' note), so that what a reader sees
is tested (``tests/test_figures.py``): a figure computed from a sample states
its n, and one drawn from too few points says so instead of showing an empty
axis.  matplotlib is imported only inside the helpers: it is an optional
dependency (the ``notebooks`` extra), and the harness reads the index without it.

pandas is optional: a table is a DataFrame, a list of dicts, or a list of
sequences with ``columns=``.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from metasae.io import atomic_path, atomic_write_text

INDEX_ENV = "METASAE_ARTIFACT_INDEX"
NOTEBOOK_ENV = "METASAE_NOTEBOOK"
SEED_ENV = "METASAE_SEED"
SEEDS_ENV = "METASAE_SEEDS"
PROFILE_ENV = "METASAE_PROFILE"
INDEX_NAME = "artifacts.jsonl"

PNG_METADATA: Mapping[str, None] = {"Software": None}
"""PNG text chunks to drop (None removes matplotlib's default entry)."""
PDF_METADATA: Mapping[str, None] = {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}
"""PDF info entries to drop: each would carry a version or the time of saving."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def save_figure(fig: Any, name: str, figures_dir: str | Path, caption: str = "", *,
                dpi: int = 150, index: str | Path | None = None) -> list[Path]:
    """Write ``fig`` (a matplotlib Figure) as PNG and PDF; return the two paths.

    The bytes depend only on what is drawn: the PNG carries no text chunk
    (matplotlib's default ``Software`` entry is removed) and the PDF no info
    entry that changes between runs or versions (``Creator``, ``Producer``,
    ``CreationDate``, ``ModDate``; ``SOURCE_DATE_EPOCH`` is then irrelevant).
    matplotlib's PDF writer adds no file ``/ID``, names font subsets from a
    hash of glyph indices (integers, which Python does not salt), and
    ``svg.hashsalt`` only concerns SVG, which is not written here.  The same
    figure therefore gives byte-identical files in any process
    (``tests/test_report_determinism.py``).
    """
    _check_name(name)
    figures_dir = Path(figures_dir)
    paths = [figures_dir / f"{name}.png", figures_dir / f"{name}.pdf"]
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata=dict(PNG_METADATA))
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, format="pdf", bbox_inches="tight", metadata=dict(PDF_METADATA))
    _record("figure", name, paths, caption, index or _default_index(figures_dir))
    return paths


def save_table(rows_or_dataframe: Any, name: str, out_dir: str | Path, caption: str = "", *,
               columns: Sequence[str] | None = None, float_digits: int = 4,
               index: str | Path | None = None) -> list[Path]:
    """Write a table as ``<out_dir>/tables/<name>.csv`` (full precision) and
    ``<name>.md`` (floats to ``float_digits`` significant digits, caption on top);
    return the two paths."""
    _check_name(name)
    cols, rows = table_rows(rows_or_dataframe, columns)
    tables = Path(out_dir) / "tables"
    paths = [tables / f"{name}.csv", tables / f"{name}.md"]
    atomic_write_text(paths[0], _to_csv(cols, rows))
    atomic_write_text(paths[1], _to_markdown(cols, rows, caption, float_digits))
    _record("table", name, paths, caption, index or _default_index(Path(out_dir)))
    return paths


def read_index(path: str | Path) -> list[dict[str, Any]]:
    """Entries of an artefact index, the latest entry per (kind, name) in first-seen order."""
    path = Path(path)
    if not path.is_file():
        return []
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            entries[(e["kind"], e["name"])] = e
    return list(entries.values())


def table_rows(data: Any, columns: Sequence[str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """Normalise a DataFrame / list of dicts / list of sequences to (columns, rows)."""
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas DataFrame, duck-typed
        df = data
        idx = getattr(df, "index", None)
        # a named index is data (e.g. set_index("run")); an unnamed one is row numbering
        if idx is not None and any(n is not None for n in idx.names):
            df = df.reset_index()
        cols = [str(c) for c in df.columns]
        rows = [list(r) for r in df.itertuples(index=False, name=None)]
        return cols, rows
    if isinstance(data, Mapping):  # dict of columns
        cols = [str(c) for c in data]
        values = [list(v) for v in data.values()]
        n = len(values[0]) if values else 0
        if any(len(v) != n for v in values):
            raise ValueError("save_table: every column of a dict table must have the same length")
        return cols, [[v[i] for v in values] for i in range(n)]
    rows_in = list(data) if isinstance(data, Iterable) else None
    if rows_in is None:
        raise TypeError(f"save_table needs a DataFrame, a list of dicts or a list of rows, not {type(data).__name__}")
    if rows_in and all(isinstance(r, Mapping) for r in rows_in):
        keys: list[Any] = list(columns) if columns else []
        for r in rows_in:
            for k in r:
                if k not in keys:
                    keys.append(k)
        return [str(k) for k in keys], [[r.get(k) for k in keys] for r in rows_in]
    if columns is None:
        raise ValueError("save_table: a list of rows needs columns=[...]")
    cols = [str(c) for c in columns]
    rows = [list(r) for r in rows_in]
    if any(len(r) != len(cols) for r in rows):
        raise ValueError(f"save_table: every row must have {len(cols)} values ({', '.join(cols)})")
    return cols, rows


# ---------------------------------------------------------------------------
# Plotting helpers
# ---------------------------------------------------------------------------

PHI_LOG_EDGES = np.logspace(-4, 0, 17)
"""|phi| bins of Figure 1a: four per decade from 1e-4 to 1.  The finest stored
|phi| histogram (``metrics.cooccurrence.ABS_FINE``) has bins 1e-5 wide, so 1e-4
is the smallest edge whose bin still spans several stored bins; the share of
pairs below it is stated in the legend, not drawn."""

MIN_DENSITY_PAIRS = 20
"""Fewest matched pairs from which Figure 2 draws a score density (ten bins);
with fewer, the panel shows the pairs one by one and says 'not enough data'."""


def count_label(x: float, digits: int = 4) -> str:
    """A count written short, to ``digits`` significant digits: 0, 500, 250k, 1.5M, 2B."""
    if x == 0:
        return "0"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}g}{suffix}"
    return f"{x:.{digits}g}"


def format_tokens_axis(ax: Any, label: str = "training tokens", max_ticks: int = 6) -> None:
    """Write token counts on the x axis as 0, 500k, 1M, ..., with as many major ticks as the panel has room
    for: at most ``max_ticks`` intervals (so at most ``max_ticks + 1`` ticks).

    matplotlib's default locator puts up to ten ticks on an axis and writes raw
    counts (``10000 20000 ...``) or moves the scale into an offset (``1e6``), which
    run together or hide the unit on the narrow panels of the training curves.
    """
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    class TokenLocator(MaxNLocator):
        """Round steps (1, 2, 2.5, 5 x 10^k); one interval per 4 em of axis length (a label of up to five
        characters and a gap), never more than ``max_ticks``."""

        def tick_values(self, vmin: float, vmax: float) -> Any:
            room = self.axis.get_tick_space() * 3 // 4 if self.axis is not None else max_ticks  # tick space: 3 em
            self.set_params(nbins=int(np.clip(room, 2, max_ticks)))
            return super().tick_values(vmin, vmax)

    ax.xaxis.set_major_locator(TokenLocator(steps=[1, 2, 2.5, 5, 10], min_n_ticks=3))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: count_label(x)))
    ax.set_xlabel(label)


def not_enough_data(ax: Any, n: int, need: int, what: str = "pairs", y: float = 0.5) -> Any:
    """Say on the panel that it was drawn from too few data points; return the text artist.

    The note, 'not enough data / n = 3 pairs (need ≥ 20)', sits above everything
    else at height ``y`` in axes coordinates, so a panel with few points (or none)
    states why instead of looking like a result.
    """
    return ax.text(0.5, y, f"not enough data\nn = {n} {what} (need ≥ {need})", transform=ax.transAxes,
                   ha="center", va="center", fontsize=9, color="firebrick", zorder=10,
                   bbox=dict(boxstyle="round", facecolor="white", edgecolor="firebrick"))


def abs_phi_cdf(summary: Any, x: Any) -> np.ndarray:
    """Fraction of a ``PhiSummary``'s pairs with |phi| <= ``x``, read off its stored |phi| histograms.

    Below the fine histogram's upper edge (0.02) the fine bins (1e-5 wide) are
    used, above it the full ones (1e-3 wide); within a bin the pairs are taken as
    spread evenly, so the distribution function is linear between bin edges.
    """
    fine, full = summary.hist_abs_fine, summary.hist_abs_full
    tail = full.spec.edges[:-1] >= fine.spec.hi * (1 - 1e-9)  # full bins right of the fine range
    edges = np.concatenate([fine.spec.edges, full.spec.edges[1:][tail]])
    counts = np.concatenate([fine.counts, full.counts[tail]])
    cum = np.concatenate([[0.0], np.cumsum(counts, dtype=float)])
    return np.interp(x, edges, cum / max(summary.n_pairs, 1))


def abs_phi_log_density(summary: Any, edges: np.ndarray = PHI_LOG_EDGES) -> np.ndarray:
    """Fraction of pairs per decade of |phi| in each bin of ``edges``: Figure 1a's density on a log |phi|
    axis, where the area over a bin is the share of pairs in it."""
    return np.diff(abs_phi_cdf(summary, edges)) / np.diff(np.log10(edges))


def plot_phi_density(ax: Any, phi_by_run: Mapping[str, Sequence[Any]],
                     edges: np.ndarray = PHI_LOG_EDGES) -> dict[str, np.ndarray]:
    """Figure 1a, the densities: |phi| per decade of each run on a log |phi| axis; return them (run -> seeds x bins).

    ``phi_by_run`` maps a run name to its ``PhiSummary`` on each seed.  One seed
    gives a step line; several give the mean with a band of ± one standard error
    over seeds.  The legend states n (seeds, pairs per seed) and the share of
    pairs left of the axis (|phi| below ``edges[0]``).
    """
    out = {}
    for i, (run, summaries) in enumerate(phi_by_run.items()):
        out[run] = np.array([abs_phi_log_density(s, edges) for s in summaries])
        pairs = float(np.mean([s.n_pairs for s in summaries]))
        below = float(np.mean([abs_phi_cdf(s, edges[0]) for s in summaries]))
        _band(ax, edges, out[run], f"C{i}", f"{run}: {_sample_label(len(summaries), pairs)}, "
                                            f"{100 * below:.1f} % < {_edge_label(edges[0])}")
    _log_phi_axis(ax, edges)
    ax.set_ylim(0, 1.35 * max(float(d.mean(axis=0).max()) for d in out.values()))  # headroom for the legend
    ax.set_ylabel("fraction of pairs per decade of |φ|")
    ax.legend(fontsize=7, loc="upper left", title=_band_title(out.values()), title_fontsize=7)
    return out


def plot_phi_density_diff(ax: Any, phi_by_run: Mapping[str, Sequence[Any]], joint: str, solo: str = "solo",
                          edges: np.ndarray = PHI_LOG_EDGES) -> np.ndarray:
    """Figure 1a, the difference: density(joint) - density(solo) per decade of |phi|; return it (seeds x bins).

    The difference is taken seed by seed (the i-th summaries of both runs come
    from the same seed, whose SAEs saw the same batches) and drawn as a step line
    for one seed, or as the mean with a ± SE band over several.
    """
    per_seed_j, per_seed_s = phi_by_run[joint], phi_by_run[solo]
    if len(per_seed_j) != len(per_seed_s):
        raise ValueError(f"{joint} has {len(per_seed_j)} seeds and {solo} {len(per_seed_s)}: "
                         f"the difference is paired by seed")
    diff = np.array([abs_phi_log_density(a, edges) - abs_phi_log_density(b, edges)
                     for a, b in zip(per_seed_j, per_seed_s)])
    n = len(diff)
    _band(ax, edges, diff, "k", f"{joint} − {solo}: n = {n} seed{'s' if n > 1 else ''}")
    ax.axhline(0, color="0.5", lw=0.5)
    _log_phi_axis(ax, edges)
    ax.set_ylabel("Δ fraction of pairs per decade of |φ|")
    ax.legend(fontsize=7, title=_band_title([diff]), title_fontsize=7)
    return diff


def plot_score_density_diff(ax: Any, joint: Sequence[Any], solo: Sequence[Any], *, title: str,
                            score_range: tuple[float, float] = (0.0, 1.0), n_bins: int = 10,
                            need: int = MIN_DENSITY_PAIRS) -> int:
    """Figure 2, one scorer: the autointerp scores of joint vs solo latents over matched pairs; return n.

    ``joint[i]`` and ``solo[i]`` score the two latents of pair i (None or nan:
    missing); n counts the pairs scored on both sides.  With n >= ``need``: each
    side's score density (lines) and the difference joint - solo (bars), the
    paper's Figure 2.  With fewer: every pair on its own row, solo and joint
    score joined, under the 'not enough data' note.  The title ends with n.
    """
    j, s = np.asarray(joint, dtype=float), np.asarray(solo, dtype=float)
    both = np.isfinite(j) & np.isfinite(s)
    j, s = j[both], s[both]
    n = len(j)
    lo, hi = score_range
    ax.set_title(f"{title}: n = {n} pairs")
    if n >= need:
        edges = np.linspace(lo, hi, n_bins + 1)
        dens_j = np.histogram(j, edges, density=True)[0]
        dens_s = np.histogram(s, edges, density=True)[0]
        ax.bar(0.5 * (edges[1:] + edges[:-1]), dens_j - dens_s, width=0.9 * (hi - lo) / n_bins, color="0.6",
               label="joint − solo")
        ax.stairs(dens_s, edges, color="C0", label="solo")
        ax.stairs(dens_j, edges, color="C1", label="joint")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("density")
    elif n:
        rows = np.arange(1, n + 1)
        ax.hlines(rows, np.minimum(s, j), np.maximum(s, j), color="0.6", lw=1)
        ax.scatter(s, rows, color="C0", label="solo", zorder=3)
        ax.scatter(j, rows, color="C1", marker="s", s=18, label="joint", zorder=3)
        ax.set_ylim(0.5, 0.5 + n / 0.7)  # the rows fill the lower 70 %, the note the rest
        ax.set_yticks(rows[::math.ceil(n / 8)])  # at most 8 labelled rows
        ax.set_ylabel("matched pair")
        not_enough_data(ax, n, need, "pairs", y=0.85)
    else:
        ax.set_yticks([])
        not_enough_data(ax, n, need, "pairs")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("score")
    if n:
        ax.legend(fontsize=7, loc="lower right" if n < need else "best")
    return n


def mean_ci(values: Sequence[Any]) -> tuple[float, float, int]:
    """Mean and 95% t half-width of the finite values, and their count (nan, nan, n when n < 2)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        return (float(x.mean()) if n else float("nan")), float("nan"), n
    return float(x.mean()), float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)), n


def plot_autointerp_bars(ax: Any, rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Figure 2 with error bars: per scorer, the mean score of solo and joint latents over the
    matched pairs scored on both sides (95% t CI over pairs), each with its random-explanation
    baseline (hatched) beside it.  ``rows``: dicts with ``scorer`` and the per-pair lists
    ``joint``, ``solo``, ``joint_random``, ``solo_random`` (None = missing).  Returns n per scorer."""
    ns = []
    width = 0.2
    for i, r in enumerate(rows):
        j, so = np.asarray(r["joint"], dtype=float), np.asarray(r["solo"], dtype=float)
        both = np.isfinite(j) & np.isfinite(so)
        ns.append(int(both.sum()))
        bars = [("solo", so[both], "C0", ""), ("solo, random expl.", r.get("solo_random", ()), "C0", "//"),
                ("joint", j[both], "C1", ""), ("joint, random expl.", r.get("joint_random", ()), "C1", "//")]
        for k, (label, vals, color, hatch) in enumerate(bars):
            m, h, n = mean_ci(vals)
            if n == 0:
                continue
            ax.bar(i + (k - 1.5) * width, m, width, yerr=None if math.isnan(h) else h, capsize=2,
                   color=color if not hatch else "white", edgecolor=color, hatch=hatch,
                   label=label if i == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['scorer']}\nn = {n} pairs" for r, n in zip(rows, ns)], fontsize=8)
    ax.axhline(0.5, color="0.5", lw=0.6, ls="--")
    ax.set_ylim(-1.05 if any(str(r["scorer"]).startswith("simulation") for r in rows) else 0.0, 1.05)
    ax.set_ylabel("mean score (95% CI over pairs)")
    if rows:
        ax.legend(fontsize=7, ncol=2)
    return ns


def plot_validation_auc(ax: Any, summary: Mapping[str, Mapping[str, Any]]) -> None:
    """The judge validation set: per score, the AUC at telling correct from random and from
    wrong-but-plausible explanations, with bootstrap 95% CIs; chance 0.5 dashed."""
    keys = list(summary)
    for k, (other, color) in enumerate((("random", "C2"), ("wrong", "C3"))):
        labelled = False
        for i, key in enumerate(keys):
            v = summary[key].get(f"auc_vs_{other}")
            ci = summary[key].get(f"auc_vs_{other}_ci")
            if v is None:
                continue
            err = None if not ci else [[v - ci[0]], [ci[1] - v]]
            ax.bar(i + (k - 0.5) * 0.38, v, 0.38, yerr=err, capsize=2, color=color,
                   label=None if labelled else f"correct vs {other} explanation")
            labelled = True
    ax.set_xticks(range(len(keys)))
    n = [summary[k].get("n_latents", 0) for k in keys]
    ax.set_xticklabels([f"{k}\nn = {m}" for k, m in zip(keys, n)], fontsize=8)
    ax.axhline(0.5, color="0.5", lw=0.6, ls="--")
    ax.axhline(0.8, color="0.3", lw=0.6, ls=":")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUC over synthetic latents")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7)


def _log_phi_axis(ax: Any, edges: np.ndarray) -> None:
    ax.set_xscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("|φ| (log scale)")


def _sample_label(n_seeds: int, pairs: float) -> str:
    pairs_label = f"{count_label(pairs, 3)} pairs"
    return f"n = {pairs_label}" if n_seeds == 1 else f"n = {n_seeds} seeds × {pairs_label}"


def _edge_label(x: float) -> str:
    """A |phi| edge as the log axis writes it: 10^-4 for a power of ten."""
    exponent = np.log10(x)
    return f"$10^{{{exponent:.0f}}}$" if exponent == round(exponent) else f"{x:g}"


def _band_title(curves: Iterable[np.ndarray]) -> str | None:
    """Legend title that explains the bands, when some curve has several seeds."""
    return "mean ± SE over seeds" if any(len(c) > 1 for c in curves) else None


def _band(ax: Any, edges: np.ndarray, rows: np.ndarray, color: str, label: str) -> None:
    """Step line of the mean of ``rows`` over bins ``edges``, with a ± SE band when there are several rows."""
    mean = rows.mean(axis=0)
    if len(rows) > 1:
        se = rows.std(axis=0, ddof=1) / np.sqrt(len(rows))
        ax.stairs(mean + se, edges, baseline=mean - se, fill=True, color=color, alpha=0.25, lw=0)
    ax.stairs(mean, edges, color=color, lw=1.5, label=label)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"artefact name {name!r} must be a file-name stem of letters, digits, '_', '-', '.' or '+'")


def _default_index(folder: Path) -> Path:
    env = os.environ.get(INDEX_ENV)
    return Path(env) if env else folder / INDEX_NAME


def _record(kind: str, name: str, paths: list[Path], caption: str, index: str | Path) -> None:
    seed = os.environ.get(SEED_ENV, "")
    seeds = os.environ.get(SEEDS_ENV, "")
    entry = {
        "kind": kind,
        "name": name,
        "paths": [str(p.resolve()) for p in paths],
        "caption": caption,
        "notebook": os.environ.get(NOTEBOOK_ENV, ""),
        "profile": os.environ.get(PROFILE_ENV, ""),
        "seed": int(seed) if seed.isdigit() else None,
        "seeds": [int(s) for s in seeds.split(",") if s.strip().isdigit()],
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    index = Path(index)
    old = index.read_text() if index.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(index, old + json.dumps(entry, sort_keys=True) + "\n")


def _to_csv(cols: list[str], rows: list[list[Any]]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_cell(v) for v in r])
    return buf.getvalue()


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        try:
            v = v.item()
        except (ValueError, TypeError):
            pass
    if isinstance(v, float):
        return repr(v)
    return v


def _md_cell(v: Any, digits: int) -> str:
    if v is None:
        return ""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, TypeError):
            pass
    if isinstance(v, bool):
        s = str(v)
    elif isinstance(v, float):
        s = "nan" if math.isnan(v) else f"{v:.{digits}g}"
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _to_markdown(cols: list[str], rows: list[list[Any]], caption: str, digits: int) -> str:
    lines = []
    if caption:
        lines += [caption.strip(), ""]
    lines.append("| " + " | ".join(_md_cell(c, digits) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_md_cell(v, digits) for v in r) + " |")
    return "\n".join(lines) + "\n"


def format_small_axis(axis: Any, max_ticks: int = 5) -> None:
    """Few ticks (at most ``max_ticks`` intervals) on an axis whose values are small differences
    (e.g. Δ mean |phi| of order 1e-4): short labels such as −4, −2, 0, 2 with the scale in one ×10⁻⁴ offset
    label, instead of raw decimals (-0.0005-0.0004...) that run together."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fmt = ScalarFormatter(useMathText=True)
    fmt.set_powerlimits((-2, 2))
    axis.set_major_formatter(fmt)
    axis.set_major_locator(MaxNLocator(max_ticks))
