"""Exact co-firing counts and the phi coefficient (SPEC 3.2 and 3.8; paper eq. 1).

For binary firing indicators of latents i and j over N tokens,

    phi_ij = (N11 N - N_i N_j) / sqrt(N_i (N - N_i) N_j (N - N_j)),

with N11 the tokens where both fire and N_i, N_j the marginal counts.  The
paper's headline is the mean of |phi| over all n(n-1)/2 pairs of one SAE on
fresh tokens; its code for this was never released, so ours is written to be
exact (integer counts, float64 arithmetic) and to scale:

* Firing is kept sparse: per chunk of tokens, CSR-like ``(indptr, indices)``
  (:class:`FiringChunk`).  No dense tokens x n float matrix is ever built; a
  transient dense bool chunk (chunk_tokens x n) is used to find the indices.
* Pair counts: per chunk ``F.T @ F`` with scipy.sparse (cost ~ tokens x L0^2,
  never tokens x n^2), its upper triangle scattered into an accumulator.
* Memory (:class:`CoFiringCounts`): the accumulator is the packed upper
  triangle, n(n-1)/2 int32 = 2 n(n-1) bytes: 0.84 GB at n = 20480, 8.6 GB at
  n = 65536.  ``rows=(lo, hi)`` keeps only the pairs whose first latent is in
  [lo, hi), so a larger dictionary can be counted in several passes over the
  tokens whose :class:`PhiSummary` results are merged with :meth:`PhiSummary.merge`.
* Cross counts (:class:`CrossCounts`) between two SAEs on the same tokens are a
  dense (rows of A) x n_b int32 block: 4 n_a n_b bytes, 1.7 GB at 20480 x 20480,
  17 GB at 65536 x 65536 (use ``rows`` there too).
* The all-pairs phi pass (:func:`phi_summary`) walks row blocks of at most
  ``block_pairs`` pairs, so its extra memory is a few arrays of that length.

Counts are int32 (they are bounded by the token count, < 2^31); arithmetic
on them is int64 then float64.

Statistics.  The paper reports Welch's t over all pairs (t = -53.1 over 209M
pairs).  :func:`welch_from_summaries` reproduces that number from two
summaries, but pairs within one SAE share latents and are far from
independent, so its p-value is anti-conservative.  Across seeds, compare the
per-seed means with :func:`paired_seed_test` (``scipy.stats.ttest_rel``): one
value per seed and condition, the seed being the unit of replication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats

from metasae.io import atomic_path

_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------
# Sparse firing
# ---------------------------------------------------------------------------


@dataclass
class FiringChunk:
    """Firing of ``n_tokens`` tokens, CSR-like: token t fires ``indices[indptr[t]:indptr[t+1]]`` (sorted)."""

    indptr: np.ndarray
    indices: np.ndarray
    n_latents: int

    @property
    def n_tokens(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def to_csr(self, cols: tuple[int, int] | None = None) -> sp.csr_matrix:
        m = sp.csr_matrix((np.ones(self.nnz, dtype=np.int32), self.indices, self.indptr),
                          shape=(self.n_tokens, self.n_latents))
        if cols is not None and cols != (0, self.n_latents):
            m = m[:, cols[0]:cols[1]]
        return m

    def counts_F(self) -> np.ndarray:
        return np.bincount(self.indices, minlength=self.n_latents).astype(np.int64)

    def to_dense(self) -> np.ndarray:
        return self.to_csr().toarray().astype(bool)


def firing_from_dense(fired_TF) -> FiringChunk:
    """A :class:`FiringChunk` from a dense boolean (tokens x n) array or tensor."""
    if isinstance(fired_TF, torch.Tensor):
        fired_TF = fired_TF.detach().cpu().numpy()
    fired = np.asarray(fired_TF, dtype=bool)
    if fired.ndim != 2:
        raise ValueError(f"firing must be 2-D (tokens x latents), got shape {fired.shape}")
    rows, cols = np.nonzero(fired)
    indptr = np.zeros(fired.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=fired.shape[0]), out=indptr[1:])
    return FiringChunk(indptr, cols.astype(np.int32), fired.shape[1])


def resolve_thresholds(sae, thresholds) -> torch.Tensor:
    """Per-latent (or 0-dim global) threshold tensor: None -> ``sae.threshold``."""
    if thresholds is None:
        return sae.threshold.detach().float()
    if hasattr(thresholds, "thresholds_F"):
        thresholds = thresholds.thresholds_F
    if isinstance(thresholds, torch.Tensor):
        return thresholds.detach().float()
    return torch.from_numpy(np.asarray(thresholds, dtype=np.float32))


@torch.no_grad()
def fired_indices(sae, batches: Iterable[torch.Tensor], thresholds=None,
                  chunk_tokens: int | None = None) -> Iterator[FiringChunk]:
    """Sparse firing of ``sae`` under the inference rule ``pre > theta``, one chunk per batch.

    ``thresholds``: an EERResult, a per-latent array/tensor, or None for the
    SAE's global threshold.  ``chunk_tokens`` caps the transient dense bool
    chunk (default 4096 tokens).
    """
    chunk = chunk_tokens or 4096
    device = _module_device(sae)
    theta = resolve_thresholds(sae, thresholds).to(device)
    for x in batches:
        for s in range(0, x.shape[0], chunk):
            xb = x[s:s + chunk].to(device=device, dtype=torch.float32)
            fired = sae.pre_acts(xb) > theta
            yield _chunk_from_torch(fired)


def _chunk_from_torch(fired_TF: torch.Tensor) -> FiringChunk:
    rows, cols = torch.nonzero(fired_TF, as_tuple=True)
    counts = torch.bincount(rows, minlength=fired_TF.shape[0])
    indptr = np.zeros(fired_TF.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts.cpu().numpy(), out=indptr[1:])
    return FiringChunk(indptr, cols.to(torch.int32).cpu().numpy(), int(fired_TF.shape[1]))


def _module_device(sae) -> torch.device:
    try:
        return next(sae.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---------------------------------------------------------------------------
# Within-SAE counts
# ---------------------------------------------------------------------------


def _row_offset(i, n: int):
    """Packed upper-triangle offset of row i (entries (i, j), j > i)."""
    i = np.asarray(i, dtype=np.int64)
    return i * n - i * (i + 1) // 2


class CoFiringCounts:
    """Exact N, N_i and N11 (i < j) of one SAE, accumulated from :class:`FiringChunk` s.

    Pair counts are stored as the packed upper triangle of rows
    ``[lo, hi)`` (all rows by default): ``n(n-1)/2`` int32 values, i.e.
    2 n(n-1) bytes = 0.84 GB at n = 20480.  Per chunk the cost is one sparse
    ``F.T @ F`` (tokens x L0^2 products) plus a scatter-add of its upper triangle.
    """

    def __init__(self, n_latents: int, rows: tuple[int, int] | None = None):
        self.n = int(n_latents)
        lo, hi = rows if rows is not None else (0, self.n)
        if not 0 <= lo < hi <= self.n:
            raise ValueError(f"rows must satisfy 0 <= lo < hi <= {self.n}, got {rows}")
        self.lo, self.hi = int(lo), int(hi)
        self._base = int(_row_offset(self.lo, self.n))
        size = int(_row_offset(self.hi, self.n)) - self._base
        self.N11_packed = np.zeros(size, dtype=np.int32)
        self.N_i = np.zeros(self.n, dtype=np.int64)
        self.N = 0
        self._G: torch.Tensor | None = None  # dense pair counts not yet packed (update_fired on a GPU)

    @property
    def nbytes(self) -> int:
        return int(self.N11_packed.nbytes + self.N_i.nbytes)

    @staticmethod
    def bytes_needed(n_latents: int) -> int:
        return 2 * n_latents * (n_latents - 1)

    def update(self, chunk: FiringChunk) -> None:
        if chunk.n_latents != self.n:
            raise ValueError(f"chunk has {chunk.n_latents} latents, counts have {self.n}")
        if self.N + chunk.n_tokens > _INT32_MAX:
            raise OverflowError("more than 2^31 - 1 tokens: int32 pair counts would overflow")
        self.N += chunk.n_tokens
        self.N_i += chunk.counts_F()
        if chunk.nnz == 0:
            return
        F = chunk.to_csr()
        left = F if (self.lo, self.hi) == (0, self.n) else F[:, self.lo:self.hi]
        G = (left.T.tocsr() @ F).tocsr()
        rows = np.arange(self.lo, self.hi, dtype=np.int64)
        r = np.repeat(rows.astype(np.int32), np.diff(G.indptr))
        c = G.indices
        keep = c > r  # upper triangle only
        # packed position of (i, j), j > i: offset(i) - base + j - i - 1
        row_key = _row_offset(rows, self.n) - self._base - rows - 1
        key = row_key[r[keep] - self.lo] + c[keep]
        d = np.ascontiguousarray(G.data[keep], dtype=np.int32)
        torch.from_numpy(self.N11_packed).index_add_(0, torch.from_numpy(key), torch.from_numpy(d))

    DENSE_BLOCK_TOKENS = 2 ** 24
    """Tokens per dense block: a float32 GEMM of 0/1 values counts exactly up to 2^24."""

    def update_fired(self, fired_TF: torch.Tensor, dense: bool | None = None) -> None:
        """Accumulate a dense boolean firing chunk (tokens x n).

        On a GPU (or with ``dense=True``) the pair counts come from a dense float32
        ``F^T F`` of the 0/1 matrix (exact: every block holds at most 2^24 tokens, and
        TF32 rounds 0 and 1 exactly), summed into an int64 n x n accumulator on the
        device and packed once, when the counts are read; elsewhere the chunk goes
        through the sparse path (:meth:`update`).  Both give the same integers.
        """
        dense = fired_TF.is_cuda if dense is None else dense
        if not dense:
            self.update(_chunk_from_torch(fired_TF.cpu()))
            return
        T, n = fired_TF.shape
        if n != self.n:
            raise ValueError(f"chunk has {n} latents, counts have {self.n}")
        if self.N + T > _INT32_MAX:
            raise OverflowError("more than 2^31 - 1 tokens: int32 pair counts would overflow")
        if self._G is None:
            self._G = torch.zeros(self.hi - self.lo, n, dtype=torch.int64, device=fired_TF.device)
        self.N += T
        self.N_i += fired_TF.sum(0).cpu().numpy().astype(np.int64)
        for t0 in range(0, T, self.DENSE_BLOCK_TOKENS):
            F = fired_TF[t0:t0 + self.DENSE_BLOCK_TOKENS].float()
            self._G += (F[:, self.lo:self.hi].T @ F).round().to(torch.int64)

    def _flush(self) -> None:
        """Pack the dense accumulator's upper triangle (j > i) into ``N11_packed``."""
        if self._G is None:
            return
        rows = torch.arange(self.lo, self.hi, device=self._G.device)[:, None]
        upper = torch.arange(self.n, device=self._G.device)[None, :] > rows  # row-major = packed order
        self.N11_packed += self._G[upper].to(torch.int32).cpu().numpy()
        self._G = None

    def update_many(self, chunks: Iterable[FiringChunk], max_tokens: int | None = None) -> "CoFiringCounts":
        for ch in chunks:
            if max_tokens is not None and self.N >= max_tokens:
                break
            self.update(ch)
        return self

    def row_block(self, i0: int, i1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, N11) for every pair with i in [i0, i1) and j > i (packed order)."""
        self._flush()
        if not self.lo <= i0 <= i1 <= self.hi:
            raise ValueError(f"rows [{i0}, {i1}) are outside the counted rows [{self.lo}, {self.hi})")
        a = int(_row_offset(i0, self.n)) - self._base
        b = int(_row_offset(i1, self.n)) - self._base
        lens = self.n - 1 - np.arange(i0, i1, dtype=np.int64)
        i = np.repeat(np.arange(i0, i1, dtype=np.int64), lens)
        starts = np.cumsum(lens) - lens
        j = i + 1 + (np.arange(b - a, dtype=np.int64) - np.repeat(starts, lens))
        return i, j, self.N11_packed[a:b]

    def dense_N11(self) -> np.ndarray:
        """Symmetric n x n int64 pair counts with N_i on the diagonal (small n only: tests, plots)."""
        out = np.zeros((self.n, self.n), dtype=np.int64)
        i, j, v = self.row_block(self.lo, self.hi)
        out[i, j] = v
        out[j, i] = v
        out[np.arange(self.n), np.arange(self.n)] = self.N_i
        return out

    def save(self, path: str | Path) -> Path:
        self._flush()
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, N11_packed=self.N11_packed, N_i=self.N_i, N=np.int64(self.N),
                         n=np.int64(self.n), rows=np.array([self.lo, self.hi], dtype=np.int64))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CoFiringCounts":
        with np.load(path) as z:
            lo, hi = (int(v) for v in z["rows"])
            out = cls(int(z["n"]), rows=(lo, hi))
            out.N11_packed[:] = z["N11_packed"]
            out.N_i[:] = z["N_i"]
            out.N = int(z["N"])
        return out


# ---------------------------------------------------------------------------
# phi over all pairs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HistSpec:
    """Uniform bins on [lo, hi]; values outside are counted as under / over."""

    lo: float
    hi: float
    n_bins: int

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.n_bins + 1)

    @property
    def centres(self) -> np.ndarray:
        e = self.edges
        return 0.5 * (e[1:] + e[:-1])

    def count(self, x: np.ndarray) -> tuple[np.ndarray, int, int]:
        under = x < self.lo
        over = x > self.hi
        inside = x[~(under | over)]
        w = (self.hi - self.lo) / self.n_bins
        idx = np.minimum(((inside - self.lo) / w).astype(np.int64), self.n_bins - 1)
        return np.bincount(idx, minlength=self.n_bins), int(under.sum()), int(over.sum())


SIGNED_FINE = HistSpec(-0.02, 0.02, 4000)
SIGNED_FULL = HistSpec(-1.0, 1.0, 2000)
ABS_FINE = HistSpec(0.0, 0.02, 2000)
ABS_FULL = HistSpec(0.0, 1.0, 1000)


@dataclass
class Histogram:
    spec: HistSpec
    counts: np.ndarray
    under: int = 0
    over: int = 0

    def add(self, x: np.ndarray) -> None:
        c, u, o = self.spec.count(x)
        self.counts += c
        self.under += u
        self.over += o

    def merge(self, other: "Histogram") -> "Histogram":
        if other.spec != self.spec:
            raise ValueError("cannot merge histograms with different bins")
        return Histogram(self.spec, self.counts + other.counts, self.under + other.under, self.over + other.over)

    def density(self) -> np.ndarray:
        """Counts / (total x bin width), total including out-of-range values."""
        tot = self.counts.sum() + self.under + self.over
        w = (self.spec.hi - self.spec.lo) / self.spec.n_bins
        return self.counts / max(tot, 1) / w

    def quantile(self, q: float) -> float:
        """Approximate quantile (bin-centre resolution), nan if it falls outside the bins."""
        tot = self.counts.sum() + self.under + self.over
        target = q * tot
        cum = self.under + np.cumsum(self.counts)
        if target < self.under or target > cum[-1]:
            return float("nan")
        return float(self.spec.centres[int(np.searchsorted(cum, target))])

    def to_dict(self) -> dict:
        return {"lo": self.spec.lo, "hi": self.spec.hi, "n_bins": self.spec.n_bins,
                "counts": self.counts.tolist(), "under": self.under, "over": self.over}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Histogram":
        return cls(HistSpec(float(d["lo"]), float(d["hi"]), int(d["n_bins"])),
                   np.asarray(d["counts"], dtype=np.int64), int(d["under"]), int(d["over"]))

    @classmethod
    def empty(cls, spec: HistSpec) -> "Histogram":
        return cls(spec, np.zeros(spec.n_bins, dtype=np.int64))


@dataclass
class Moments:
    """Count, mean and M2 (sum of squared deviations), combined exactly-ish with Chan's formula."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        nb = int(x.size)
        if nb == 0:
            return
        mb = float(np.mean(x, dtype=np.float64))
        m2b = float(np.sum((x - mb) ** 2, dtype=np.float64))
        self.merge_in(Moments(nb, mb, m2b))

    def merge_in(self, o: "Moments") -> None:
        if o.n == 0:
            return
        n = self.n + o.n
        delta = o.mean - self.mean
        self.mean += delta * o.n / n
        self.m2 += o.m2 + delta * delta * self.n * o.n / n
        self.n = n

    @property
    def var(self) -> float:
        """Sample variance (ddof = 1)."""
        return self.m2 / (self.n - 1) if self.n > 1 else float("nan")


@dataclass
class PhiSummary:
    """Everything the tables and figures need about phi over all alive pairs of one SAE."""

    n_latents: int
    n_tokens: int
    n_alive: int
    n_never_fired: int
    n_always_fired: int
    n_pairs: int
    abs_moments: Moments
    signed_moments: Moments
    sum_abs: float
    sum_sq: float
    """Sum of phi^2 over pairs (the same for phi and |phi|)."""
    n_negative: int
    n_zero: int
    n_positive: int
    max_phi: float
    min_phi: float
    hist_signed_fine: Histogram
    hist_signed_full: Histogram
    hist_abs_fine: Histogram
    hist_abs_full: Histogram
    rows: tuple[int, int] = (0, 0)
    extra: dict = field(default_factory=dict)

    @property
    def mean_abs_phi(self) -> float:
        return self.abs_moments.mean if self.n_pairs else float("nan")

    @property
    def mean_phi(self) -> float:
        return self.signed_moments.mean if self.n_pairs else float("nan")

    @property
    def var_abs_phi(self) -> float:
        return self.abs_moments.var

    @property
    def frac_negative(self) -> float:
        return self.n_negative / self.n_pairs if self.n_pairs else float("nan")

    def merge(self, other: "PhiSummary") -> "PhiSummary":
        """Combine summaries of disjoint row ranges counted on the same tokens."""
        if (self.n_latents, self.n_tokens, self.n_alive) != (other.n_latents, other.n_tokens, other.n_alive):
            raise ValueError("summaries come from different latents or tokens")
        am, sm = Moments(**vars(self.abs_moments)), Moments(**vars(self.signed_moments))
        am.merge_in(other.abs_moments)
        sm.merge_in(other.signed_moments)
        rows = (min(self.rows[0], other.rows[0]), max(self.rows[1], other.rows[1]))
        return PhiSummary(
            self.n_latents, self.n_tokens, self.n_alive, self.n_never_fired, self.n_always_fired,
            self.n_pairs + other.n_pairs, am, sm, self.sum_abs + other.sum_abs, self.sum_sq + other.sum_sq,
            self.n_negative + other.n_negative, self.n_zero + other.n_zero, self.n_positive + other.n_positive,
            max(self.max_phi, other.max_phi), min(self.min_phi, other.min_phi),
            self.hist_signed_fine.merge(other.hist_signed_fine), self.hist_signed_full.merge(other.hist_signed_full),
            self.hist_abs_fine.merge(other.hist_abs_fine), self.hist_abs_full.merge(other.hist_abs_full), rows)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("n_latents", "n_tokens", "n_alive", "n_never_fired", "n_always_fired",
                                           "n_pairs", "sum_abs", "sum_sq", "n_negative", "n_zero", "n_positive",
                                           "max_phi", "min_phi")}
        d["rows"] = list(self.rows)
        d["abs_moments"] = vars(self.abs_moments).copy()
        d["signed_moments"] = vars(self.signed_moments).copy()
        for h in ("hist_signed_fine", "hist_signed_full", "hist_abs_fine", "hist_abs_full"):
            d[h] = getattr(self, h).to_dict()
        d["mean_abs_phi"] = self.mean_abs_phi
        d["mean_phi"] = self.mean_phi
        d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "PhiSummary":
        kw = {k: d[k] for k in ("n_latents", "n_tokens", "n_alive", "n_never_fired", "n_always_fired", "n_pairs",
                                "sum_abs", "sum_sq", "n_negative", "n_zero", "n_positive", "max_phi", "min_phi")}
        for h in ("hist_signed_fine", "hist_signed_full", "hist_abs_fine", "hist_abs_full"):
            kw[h] = Histogram.from_dict(d[h])
        return cls(**kw, abs_moments=Moments(**d["abs_moments"]), signed_moments=Moments(**d["signed_moments"]),
                   rows=tuple(d.get("rows", (0, 0))), extra=dict(d.get("extra", {})))


def alive_mask(N_i: np.ndarray, N: int) -> np.ndarray:
    """Latents whose phi is defined: fired at least once and not on every token."""
    N_i = np.asarray(N_i)
    return (N_i > 0) & (N_i < N)


def phi_from_counts(N11, N_i, N_j, N: int) -> np.ndarray:
    """phi in float64 from integer counts (numerator exact in int64); nan where undefined."""
    N11 = np.asarray(N11, dtype=np.int64)
    Ni = np.asarray(N_i, dtype=np.int64)
    Nj = np.asarray(N_j, dtype=np.int64)
    num = (N11 * np.int64(N) - Ni * Nj).astype(np.float64)
    den = np.sqrt((Ni * (N - Ni)).astype(np.float64)) * np.sqrt((Nj * (N - Nj)).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def phi_summary(counts: CoFiringCounts, block_pairs: int = 1 << 22,
                hist_specs: Mapping[str, HistSpec] | None = None) -> PhiSummary:
    """Mean |phi| and its distribution over all pairs of alive latents (SPEC 3.2).

    Latents that never fire, or fire on every token, have undefined phi: they
    are excluded and counted (``n_never_fired``, ``n_always_fired``).  The pass
    walks row blocks of about ``block_pairs`` pairs.  ``hist_specs`` may
    override the bins of ``signed_fine``, ``signed_full``, ``abs_fine``, ``abs_full``.
    """
    specs = {"signed_fine": SIGNED_FINE, "signed_full": SIGNED_FULL, "abs_fine": ABS_FINE, "abs_full": ABS_FULL}
    specs.update(hist_specs or {})
    hists = {k: Histogram.empty(v) for k, v in specs.items()}
    N, n = counts.N, counts.n
    Ni = counts.N_i
    alive = alive_mask(Ni, N)
    s = np.sqrt((Ni * (N - Ni)).astype(np.float64))
    am, sm = Moments(), Moments()
    sum_abs = sum_sq = 0.0
    n_neg = n_zero = n_pos = 0
    mx, mn = -math.inf, math.inf
    n_pairs = 0
    i0 = counts.lo
    while i0 < counts.hi:
        # grow the block until it holds about block_pairs pairs
        i1 = i0 + 1
        size = n - 1 - i0
        while i1 < counts.hi and size + (n - 1 - i1) <= block_pairs:
            size += n - 1 - i1
            i1 += 1
        if alive[i0:i1].any():
            i, j, v = counts.row_block(i0, i1)
            keep = alive[i] & alive[j]
            i, j, v = i[keep], j[keep], v[keep]
            num = (v.astype(np.int64) * np.int64(N) - Ni[i] * Ni[j]).astype(np.float64)
            phi = num / (s[i] * s[j])
            a = np.abs(phi)
            n_pairs += phi.size
            am.add(a)
            sm.add(phi)
            sum_abs += float(np.sum(a, dtype=np.float64))
            sum_sq += float(np.dot(phi, phi))
            n_neg += int((phi < 0).sum())
            n_zero += int((phi == 0).sum())
            n_pos += int((phi > 0).sum())
            if phi.size:
                mx, mn = max(mx, float(phi.max())), min(mn, float(phi.min()))
            hists["signed_fine"].add(phi)
            hists["signed_full"].add(phi)
            hists["abs_fine"].add(a)
            hists["abs_full"].add(a)
        i0 = i1
    return PhiSummary(
        n_latents=n, n_tokens=N, n_alive=int(alive.sum()), n_never_fired=int((Ni == 0).sum()),
        n_always_fired=int(((Ni == N) & (Ni > 0)).sum()), n_pairs=n_pairs, abs_moments=am, signed_moments=sm,
        sum_abs=sum_abs, sum_sq=sum_sq, n_negative=n_neg, n_zero=n_zero, n_positive=n_pos, max_phi=mx, min_phi=mn,
        hist_signed_fine=hists["signed_fine"], hist_signed_full=hists["signed_full"],
        hist_abs_fine=hists["abs_fine"], hist_abs_full=hists["abs_full"], rows=(counts.lo, counts.hi))


# ---------------------------------------------------------------------------
# Tests between SAEs
# ---------------------------------------------------------------------------


@dataclass
class WelchResult:
    t: float
    dof: float
    p: float
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int


def welch_from_summaries(a: PhiSummary, b: PhiSummary, signed: bool = False) -> WelchResult:
    """Welch's t of mean |phi| (or signed phi) of ``a`` vs ``b`` over pairs, as the paper reports it.

    Equal to ``scipy.stats.ttest_ind(pairs_a, pairs_b, equal_var=False)``.
    Pairs of one SAE are not independent (each latent is in n - 1 pairs), so
    the p-value overstates the evidence; use :func:`paired_seed_test` across seeds.
    """
    ma = a.signed_moments if signed else a.abs_moments
    mb = b.signed_moments if signed else b.abs_moments
    va, vb = ma.var / ma.n, mb.var / mb.n
    se = math.sqrt(va + vb)
    t = (ma.mean - mb.mean) / se if se > 0 else float("nan")
    dof = (va + vb) ** 2 / (va**2 / (ma.n - 1) + vb**2 / (mb.n - 1)) if se > 0 else float("nan")
    p = float(2 * stats.t.sf(abs(t), dof)) if math.isfinite(t) else float("nan")
    return WelchResult(float(t), float(dof), p, ma.mean, mb.mean, ma.n, mb.n)


@dataclass
class SeedTest:
    t: float
    p: float
    mean_diff: float
    se: float
    n: int


def paired_seed_test(values_joint: Sequence[float], values_solo: Sequence[float]) -> SeedTest:
    """Paired t-test (``scipy.stats.ttest_rel``) of one value per seed, joint vs solo.

    Each seed trains its solo and joint SAEs from the same init and batches,
    so seeds pair the conditions; the seed (not the latent pair) is the unit
    of replication.  With fewer than 2 seeds t, p and se are nan.
    """
    j = np.asarray(values_joint, dtype=np.float64)
    s = np.asarray(values_solo, dtype=np.float64)
    if j.shape != s.shape or j.ndim != 1:
        raise ValueError(f"need two equal-length 1-D sequences, got {j.shape} and {s.shape}")
    d = j - s
    n = int(d.size)
    if n < 2:
        return SeedTest(float("nan"), float("nan"), float(d.mean()) if n else float("nan"), float("nan"), n)
    res = stats.ttest_rel(j, s)
    se = float(d.std(ddof=1) / math.sqrt(n))
    return SeedTest(float(res.statistic), float(res.pvalue), float(d.mean()), se, n)


# ---------------------------------------------------------------------------
# Cross-SAE counts and phi
# ---------------------------------------------------------------------------


class CrossCounts:
    """Exact N, N_a, N_b and N11[a, b] between two SAEs' latents on the same tokens.

    N11 is a dense (hi - lo) x n_b int32 block for latents of A in ``rows``:
    4 n_a n_b bytes (1.7 GB at 20480 x 20480).  Per chunk: sparse ``F_a.T @ F_b``.
    """

    def __init__(self, n_a: int, n_b: int, rows: tuple[int, int] | None = None):
        self.n_a, self.n_b = int(n_a), int(n_b)
        lo, hi = rows if rows is not None else (0, self.n_a)
        if not 0 <= lo < hi <= self.n_a:
            raise ValueError(f"rows must satisfy 0 <= lo < hi <= {self.n_a}, got {rows}")
        self.lo, self.hi = int(lo), int(hi)
        self.N11 = np.zeros((self.hi - self.lo, self.n_b), dtype=np.int32)
        self.N_a = np.zeros(self.n_a, dtype=np.int64)
        self.N_b = np.zeros(self.n_b, dtype=np.int64)
        self.N = 0

    @property
    def nbytes(self) -> int:
        return int(self.N11.nbytes + self.N_a.nbytes + self.N_b.nbytes)

    def update(self, chunk_a: FiringChunk, chunk_b: FiringChunk) -> None:
        if chunk_a.n_tokens != chunk_b.n_tokens:
            raise ValueError(f"chunks cover different tokens ({chunk_a.n_tokens} vs {chunk_b.n_tokens})")
        if (chunk_a.n_latents, chunk_b.n_latents) != (self.n_a, self.n_b):
            raise ValueError("chunk widths do not match the counts")
        if self.N + chunk_a.n_tokens > _INT32_MAX:
            raise OverflowError("more than 2^31 - 1 tokens: int32 pair counts would overflow")
        self.N += chunk_a.n_tokens
        self.N_a += chunk_a.counts_F()
        self.N_b += chunk_b.counts_F()
        if chunk_a.nnz == 0 or chunk_b.nnz == 0:
            return
        G = (chunk_a.to_csr((self.lo, self.hi)).T.tocsr() @ chunk_b.to_csr()).tocsr()
        r = np.repeat(np.arange(self.hi - self.lo, dtype=np.int64), np.diff(G.indptr))
        key = r * self.n_b + G.indices.astype(np.int64)
        torch.from_numpy(self.N11.reshape(-1)).index_add_(0, torch.from_numpy(key),
                                                          torch.from_numpy(G.data.astype(np.int32)))

    def transposed(self) -> "CrossCounts":
        """The same counts seen from B (only when all rows of A are held)."""
        if (self.lo, self.hi) != (0, self.n_a):
            raise ValueError("transposed() needs the counts of every latent of A")
        out = CrossCounts.__new__(CrossCounts)
        out.n_a, out.n_b, out.lo, out.hi = self.n_b, self.n_a, 0, self.n_b
        out.N11 = np.ascontiguousarray(self.N11.T)
        out.N_a, out.N_b, out.N = self.N_b, self.N_a, self.N
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, N11=self.N11, N_a=self.N_a, N_b=self.N_b, N=np.int64(self.N),
                         rows=np.array([self.lo, self.hi], dtype=np.int64))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CrossCounts":
        with np.load(path) as z:
            lo, hi = (int(v) for v in z["rows"])
            out = cls(int(z["N_a"].shape[0]), int(z["N_b"].shape[0]), rows=(lo, hi))
            out.N11[:] = z["N11"]
            out.N_a[:] = z["N_a"]
            out.N_b[:] = z["N_b"]
            out.N = int(z["N"])
        return out


def cross_phi_matrix(counts: CrossCounts, dtype=np.float32) -> np.ndarray:
    """Dense phi between latents of A (held rows) and all of B; nan where undefined.

    Size (hi - lo) x n_b of ``dtype``: 1.7 GB float32 at 20480 x 20480.  For
    rankings prefer :func:`topk_cross_phi`, which never holds the whole matrix.
    """
    out = np.empty(counts.N11.shape, dtype=dtype)
    step = max(1, (1 << 22) // max(1, counts.n_b))
    for r0 in range(0, counts.N11.shape[0], step):
        r1 = min(r0 + step, counts.N11.shape[0])
        out[r0:r1] = phi_from_counts(counts.N11[r0:r1], counts.N_a[counts.lo + r0:counts.lo + r1, None],
                                     counts.N_b[None, :], counts.N)
    return out


@dataclass
class TopKCrossPhi:
    """For each latent of one SAE (rows), its ``k`` highest-phi partners in the other, descending.

    ``idx`` is -1 and ``phi`` nan where fewer than k partners have a defined phi.
    """

    idx: np.ndarray
    phi: np.ndarray
    rows: tuple[int, int]

    @property
    def top1(self) -> np.ndarray:
        return self.phi[:, 0]

    @property
    def top2(self) -> np.ndarray:
        return self.phi[:, 1] if self.phi.shape[1] > 1 else np.full(self.phi.shape[0], np.nan)


def topk_cross_phi(counts: CrossCounts, k: int = 2, block_rows: int | None = None) -> TopKCrossPhi:
    """Top-k cross-phi partners in B of each held latent of A, computed in row blocks.

    For the mirror direction (each latent of B against A) use ``counts.transposed()``.
    """
    n_rows = counts.N11.shape[0]
    k = min(k, counts.n_b)
    step = block_rows or max(1, (1 << 22) // max(1, counts.n_b))
    idx = np.full((n_rows, k), -1, dtype=np.int64)
    val = np.full((n_rows, k), np.nan, dtype=np.float64)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        phi = phi_from_counts(counts.N11[r0:r1], counts.N_a[counts.lo + r0:counts.lo + r1, None],
                              counts.N_b[None, :], counts.N)
        key = np.where(np.isnan(phi), -np.inf, phi)
        part = np.argpartition(-key, k - 1, axis=1)[:, :k] if k < counts.n_b else np.tile(
            np.arange(counts.n_b), (r1 - r0, 1))
        pv = np.take_along_axis(key, part, 1)
        order = np.argsort(-pv, axis=1, kind="stable")
        part = np.take_along_axis(part, order, 1)
        pv = np.take_along_axis(pv, order, 1)
        ok = np.isfinite(pv)
        idx[r0:r1] = np.where(ok, part, -1)
        val[r0:r1] = np.where(ok, pv, np.nan)
    return TopKCrossPhi(idx, val, (counts.lo, counts.hi))


# ---------------------------------------------------------------------------
# One pass over activations for several SAEs
# ---------------------------------------------------------------------------


@torch.no_grad()
def accumulate_counts(batches: Iterable[torch.Tensor], models: Mapping[str, tuple],
                      within: Sequence[str] = (), cross: Sequence[tuple[str, str]] = (),
                      max_tokens: int | None = None, chunk_tokens: int = 4096) -> dict:
    """Count firing of several SAEs on the same tokens in one pass.

    ``models`` maps a name to ``(sae, thresholds)``; ``within`` names SAEs to
    get a :class:`CoFiringCounts`, ``cross`` lists (a, b) names to get a
    :class:`CrossCounts`.  Returns ``{name: CoFiringCounts, (a, b): CrossCounts}``.
    """
    names = sorted(set(within) | {a for a, _ in cross} | {b for _, b in cross})
    missing = [nm for nm in names if nm not in models]
    if missing:
        raise KeyError(f"unknown SAE names {missing}; known: {sorted(models)}")
    out: dict = {}
    for nm in within:
        out[nm] = CoFiringCounts(int(models[nm][0].cfg.n_latents))
    for a, b in cross:
        out[(a, b)] = CrossCounts(int(models[a][0].cfg.n_latents), int(models[b][0].cfg.n_latents))
    thetas = {nm: resolve_thresholds(models[nm][0], models[nm][1]).to(_module_device(models[nm][0]))
              for nm in names}
    n_seen = 0
    for x in batches:
        for s in range(0, x.shape[0], chunk_tokens):
            if max_tokens is not None and n_seen >= max_tokens:
                return out
            xb = x[s:s + chunk_tokens]
            if max_tokens is not None:
                xb = xb[:max_tokens - n_seen]
            chunks = {}
            for nm in names:
                sae = models[nm][0]
                pre = sae.pre_acts(xb.to(device=_module_device(sae), dtype=torch.float32))
                chunks[nm] = _chunk_from_torch(pre > thetas[nm])
            for nm in within:
                out[nm].update(chunks[nm])
            for a, b in cross:
                out[(a, b)].update(chunks[a], chunks[b])
            n_seen += xb.shape[0]
    return out
