"""Across-seed aggregation: means with standard errors, and tests paired by seed.

The paper reports one run per grid cell and a Welch test over ~209M pairs of
latents of the same two SAEs, which treats dependent pairs as independent.
Here every headline number is a mean over seeds with its standard error (n
shown), and the joint-vs-solo comparison is a paired t-test across seeds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np


def mean_se(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) over the finite values; se is nan for n < 2."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se, n


def aggregate_rows(rows_by_seed: dict[int, list[dict[str, Any]]], key: str, metrics: Sequence[str],
                   carry: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Group rows of several seeds by `key` and report mean, se and n of each metric.

    ``carry`` names columns copied from the first row of each group (e.g. lambda2).
    Output columns: key, carried columns, then ``<metric>_mean``, ``<metric>_se``, ``n_seeds``.
    """
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    order: list[Any] = []
    for seed in sorted(rows_by_seed):
        for r in rows_by_seed[seed]:
            if r[key] not in groups:
                order.append(r[key])
            groups[r[key]].append(r)
    out = []
    for k in order:
        g = groups[k]
        row: dict[str, Any] = {key: k}
        for c in carry:
            row[c] = g[0].get(c)
        n_max = 0
        for m in metrics:
            mean, se, n = mean_se(r.get(m, float("nan")) for r in g)
            row[f"{m}_mean"], row[f"{m}_se"] = mean, se
            n_max = max(n_max, n)
        row["n_seeds"] = n_max
        out.append(row)
    return out


def paired_by_seed(rows_by_seed: dict[int, list[dict[str, Any]]], a: str, b: str, metric: str,
                   key: str = "run") -> dict[str, Any]:
    """Paired t-test across seeds of `metric` for run `a` vs run `b` (scipy.stats.ttest_rel).

    Returns n, the per-seed values, mean difference (a - b), its standard error,
    t and the two-sided p (nan when fewer than two seeds).
    """
    from metasae.metrics.cooccurrence import paired_seed_test

    va, vb, seeds = [], [], []
    for s in sorted(rows_by_seed):
        ra = next((r for r in rows_by_seed[s] if r[key] == a), None)
        rb = next((r for r in rows_by_seed[s] if r[key] == b), None)
        if ra is None or rb is None:
            continue
        x, y = ra.get(metric), rb.get(metric)
        if x is None or y is None or not (np.isfinite(x) and np.isfinite(y)):
            continue
        va.append(float(x))
        vb.append(float(y))
        seeds.append(s)
    res = paired_seed_test(va, vb)
    return {"a": a, "b": b, "metric": metric, "n": res.n, "seeds": seeds, "values_a": va, "values_b": vb,
            "mean_diff": res.mean_diff, "se_diff": res.se, "t": res.t, "p": res.p}


def matched_reconstruction(rows: list[dict[str, Any]], target_delta_l2: float, role: str,
                           metric: str = "delta_l2_pct") -> dict[str, Any] | None:
    """The row of `role` whose `metric` is closest to `target_delta_l2` (baselines at matched cost)."""
    cand = [r for r in rows if r.get("role") == role and np.isfinite(r.get(metric, float("nan")))]
    if not cand:
        return None
    return min(cand, key=lambda r: abs(r[metric] - target_delta_l2))
