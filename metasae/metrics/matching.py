"""Hungarian matching of two dictionaries on decoder cosine (SPEC 3.6; paper §5.2).

The paper's code runs ``lapjv`` on -cosine(W_dec) over all latents and then
keeps the pairs where both latents are alive (threshold below its dead value);
it applies no cosine cut-off.  We do the same with
``scipy.optimize.linear_sum_assignment`` (maximise).  Memory: the n_a x n_b
cosine matrix in float64 (3.4 GB at 20480 x 20480, which scipy needs anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


@dataclass
class MatchResult:
    idx_a: np.ndarray
    idx_b: np.ndarray
    cosine: np.ndarray
    n_matched: int
    """Pairs the assignment produced before the alive filter."""

    def __len__(self) -> int:
        return int(self.idx_a.shape[0])


def _as_np(w) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu().double().numpy()
    return np.asarray(w, dtype=np.float64)


def decoder_cosine(W_dec_a_FD, W_dec_b_FD) -> np.ndarray:
    a, b = _as_np(W_dec_a_FD), _as_np(W_dec_b_FD)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders have different widths ({a.shape[1]} vs {b.shape[1]})")
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    a = a / np.where(na > 0, na, 1.0)
    b = b / np.where(nb > 0, nb, 1.0)
    return a @ b.T


def hungarian_match(W_dec_a_FD, W_dec_b_FD, alive_a=None, alive_b=None) -> MatchResult:
    """Maximum-total-cosine one-to-one matching of rows of A to rows of B.

    The assignment uses every latent; pairs where either latent is not alive
    (``alive_*`` boolean arrays, None = all alive) are dropped afterwards.
    Results are sorted by ``idx_a``.
    """
    cos = decoder_cosine(W_dec_a_FD, W_dec_b_FD)
    ia, ib = linear_sum_assignment(cos, maximize=True)
    n_matched = int(ia.size)
    keep = np.ones(ia.size, dtype=bool)
    if alive_a is not None:
        keep &= np.asarray(alive_a, dtype=bool)[ia]
    if alive_b is not None:
        keep &= np.asarray(alive_b, dtype=bool)[ib]
    ia, ib = ia[keep], ib[keep]
    return MatchResult(ia.astype(np.int64), ib.astype(np.int64), cos[ia, ib], n_matched)
