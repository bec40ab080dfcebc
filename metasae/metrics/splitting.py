"""Splitting and merging candidates from cross-phi (SPEC 3.8; paper §5.4, App. E).

A solo latent that joint training *split* fires whenever any of its children
fires, so it correlates strongly with at least two joint latents: the paper
ranks solo latents (firing rate <= 5%) by their 2nd-highest cross-phi to joint
latents, drops "junk" latents dominated by one single-character or
non-alphanumeric token, and keeps the top 200.  Merging candidates are the
mirror: joint latents ranked by their 2nd-highest cross-phi to solo latents.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from metasae.metrics.cooccurrence import CrossCounts, TopKCrossPhi, topk_cross_phi


def is_junk_token(token: str | None, frac: float | None, dominance: float = 0.5) -> bool:
    """True when a latent's most frequent firing token takes >= ``dominance`` of its
    firings and, stripped, has no alphanumeric character or is a single character."""
    if token is None or frac is None or not np.isfinite(frac) or frac < dominance:
        return False
    s = token.strip()
    return len(s) <= 1 or not any(ch.isalnum() for ch in s)


def _as_topk(cross, k: int) -> TopKCrossPhi:
    if isinstance(cross, TopKCrossPhi):
        return cross
    if isinstance(cross, CrossCounts):
        return topk_cross_phi(cross, k)
    phi = np.asarray(cross, dtype=np.float64)
    if phi.ndim != 2:
        raise ValueError("cross must be a TopKCrossPhi, a CrossCounts or a 2-D cross-phi matrix")
    kk = min(k, phi.shape[1])
    key = np.where(np.isnan(phi), -np.inf, phi)
    idx = np.argsort(-key, axis=1, kind="stable")[:, :kk]
    val = np.take_along_axis(key, idx, 1)
    ok = np.isfinite(val)
    return TopKCrossPhi(np.where(ok, idx, -1), np.where(ok, val, np.nan), (0, phi.shape[0]))


def _rank(cross, firing_rate, dominant_token, dominant_frac, max_rate, top, dominance, k, min_child_phi,
          parent_name: str, child_name: str) -> list[dict]:
    tk = _as_topk(cross, k)
    if tk.phi.shape[1] < 2:
        raise ValueError("ranking needs at least the top-2 cross-phi of each latent")
    lo = tk.rows[0]
    rate = np.asarray(firing_rate, dtype=np.float64)
    n_rows = tk.phi.shape[0]
    parents = np.arange(lo, lo + n_rows)
    top2 = tk.phi[:, 1]
    ok = np.isfinite(top2) & (rate[parents] > 0) & (rate[parents] <= max_rate)
    if dominant_token is not None:
        junk = np.array([is_junk_token(dominant_token[p], None if dominant_frac is None else dominant_frac[p],
                                       dominance) for p in parents])
        ok &= ~junk
    cand = np.nonzero(ok)[0]
    cand = cand[np.argsort(-top2[cand], kind="stable")][:top]
    out = []
    for r in cand:
        p = int(parents[r])
        children = [{child_name: int(j), "phi": float(v)} for j, v in zip(tk.idx[r], tk.phi[r])
                    if j >= 0 and np.isfinite(v) and v > min_child_phi]
        out.append({
            parent_name: p,
            "firing_rate": float(rate[p]),
            "phi_top1": float(tk.phi[r, 0]),
            "phi_top2": float(tk.phi[r, 1]),
            "children": children,
            "dominant_token": None if dominant_token is None else dominant_token[p],
            "dominant_frac": None if dominant_frac is None else float(dominant_frac[p]),
        })
    return out


def splitting_candidates(cross_solo_to_joint, solo_firing_rate, dominant_token: Sequence[str] | None = None,
                         dominant_frac=None, max_rate: float = 0.05, top: int = 200, dominance: float = 0.5,
                         k: int = 5, min_child_phi: float = 0.0) -> list[dict]:
    """Solo latents split by joint training, best first.

    ``cross_solo_to_joint``: a :class:`TopKCrossPhi` (rows = solo latents), a
    :class:`CrossCounts` (A = solo, B = joint) or a dense solo x joint phi
    matrix.  ``dominant_token[i]`` / ``dominant_frac[i]``: solo latent i's most
    frequent firing token and the fraction of its firings on it (optional).
    Each record: ``parent`` (solo latent), ``firing_rate``, ``phi_top1``,
    ``phi_top2`` (the ranking key), ``children`` (joint latents among its top
    ``k`` with phi > ``min_child_phi``, each ``{"child", "phi"}``), the dominant token.
    """
    return _rank(cross_solo_to_joint, solo_firing_rate, dominant_token, dominant_frac, max_rate, top, dominance,
                 k, min_child_phi, "parent", "child")


def merging_candidates(cross_joint_to_solo, joint_firing_rate, dominant_token: Sequence[str] | None = None,
                       dominant_frac=None, max_rate: float = 0.05, top: int = 200, dominance: float = 0.5,
                       k: int = 5, min_child_phi: float = 0.0) -> list[dict]:
    """Joint latents that merge several solo latents: the mirror of :func:`splitting_candidates`.

    Pass joint -> solo cross-phi, e.g. ``topk_cross_phi(counts.transposed(), 5)``
    for ``counts`` = CrossCounts(solo, joint); rows, rates and tokens are joint latents'.
    """
    return _rank(cross_joint_to_solo, joint_firing_rate, dominant_token, dominant_frac, max_rate, top, dominance,
                 k, min_child_phi, "parent", "child")
