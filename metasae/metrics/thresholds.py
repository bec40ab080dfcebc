"""EER firing thresholds (SPEC 3.1; paper App. A).

BatchTopK decides firing jointly over a batch, so a latent's activity on one
token depends on the other tokens it was batched with.  For evaluation the
paper replaces that rule by one threshold per latent: on calibration tokens,
the positive pre-activations of each latent are split into those BatchTopK
kept and those it did not, each histogrammed on ``n_bins`` bins of
``[0, max_value)``, and the threshold is the bin centre where the false-negative
rate (kept values below the threshold) equals the false-positive rate (not-kept
values above it), i.e. the minimiser of ``|CDF_kept + CDF_notkept - 1|``.
Latent i then fires on a token iff ``pre_i > theta_i``, whatever the batch.

Choices where the paper is silent:

* Ties.  ``|CDF_kept + CDF_notkept - 1|`` is the absolute value of a
  non-decreasing function, so its minimisers form one run of bins.  When the
  two distributions are separated the run spans the gap between them; we take
  the midpoint of the run's first and last bin centres (the paper's code takes
  the first, which puts the threshold inside the top not-kept bin).
* A latent with kept values but no positive not-kept values has
  ``CDF_notkept = 1`` (no false positive is possible).
* Fallbacks: fewer than ``min_selected`` selections -> ``max(min kept value,
  max not-kept value)`` (exact values, not bins: "conservative"); never
  selected -> ``+inf`` (never fires; the paper used 10).
* Values ``>= max_value`` are clamped into the last bin and counted per latent
  (``n_clamped_F``); a warning says how many.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from metasae.io import atomic_path

THRESHOLDS_FILE = "thresholds.safetensors"


class Fallback(enum.IntEnum):
    """How a latent's threshold was chosen."""

    EER = 0
    """Histogram crossing (FNR = FPR)."""
    RARE = 1
    """Fewer than ``min_selected`` selections: max(min kept, max not kept)."""
    DEAD = 2
    """Never selected by BatchTopK: +inf, never fires."""


@dataclass
class EERResult:
    """Per-latent thresholds and the statistics they came from (arrays end in _F)."""

    thresholds_F: np.ndarray
    """float32; latent i fires iff pre_i > thresholds_F[i]."""
    n_selected_F: np.ndarray
    """int64; positive pre-activations kept by BatchTopK."""
    n_positive_F: np.ndarray
    """int64; all positive pre-activations."""
    fallback_F: np.ndarray
    """int8 codes of :class:`Fallback`."""
    min_kept_F: np.ndarray
    """float32; smallest kept positive value (+inf if none)."""
    max_notkept_F: np.ndarray
    """float32; largest positive value not kept (0 if none)."""
    n_clamped_F: np.ndarray
    """int64; positive values >= max_value, clamped into the last bin."""
    n_tokens: int
    batch_size: int
    n_bins: int
    max_value: float
    min_selected: int
    hist_kept_FH: np.ndarray | None = None
    """int64 (n_latents x n_bins) histogram of kept values; None when loaded without it."""
    hist_notkept_FH: np.ndarray | None = None
    n_dropped_tokens: int = 0
    """Tokens of a last incomplete batch that were not used."""
    extra: dict = field(default_factory=dict)

    @property
    def n_latents(self) -> int:
        return int(self.thresholds_F.shape[0])

    @property
    def bin_centres(self) -> np.ndarray:
        w = self.max_value / self.n_bins
        return (np.arange(self.n_bins) + 0.5) * w

    def counts_by_fallback(self) -> dict[str, int]:
        return {f.name.lower(): int((self.fallback_F == f).sum()) for f in Fallback}

    def thresholds_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.from_numpy(self.thresholds_F.astype(np.float32)).to(device)

    def fires(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """Boolean firing under the inference rule pre > theta."""
        return pre_BF > self.thresholds_tensor(pre_BF.device)


# ---------------------------------------------------------------------------
# Re-batching
# ---------------------------------------------------------------------------


def rebatch(batches: Iterable[torch.Tensor], batch_size: int, drop_last: bool = True,
            stats: dict | None = None) -> Iterator[torch.Tensor]:
    """Re-cut a stream of (tokens x d) tensors into batches of exactly ``batch_size`` tokens.

    BatchTopK keeps k * B entries of a B-token batch, so calibration must see
    the batch size training used.  A last incomplete batch is dropped when
    ``drop_last`` and at least one full batch was produced; if the whole stream
    is shorter than one batch it is used as is (with a warning).  ``stats``
    (optional dict) receives ``n_tokens`` and ``n_dropped_tokens``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    buf: list[torch.Tensor] = []
    n_buf = 0
    n_used = 0
    for x in batches:
        if x.ndim != 2:
            raise ValueError(f"activation batches must be 2-D (tokens x d), got shape {tuple(x.shape)}")
        buf.append(x)
        n_buf += x.shape[0]
        if n_buf < batch_size:
            continue
        cat = torch.cat(buf) if len(buf) > 1 else buf[0]
        start = 0
        while n_buf - start >= batch_size:
            yield cat[start:start + batch_size]
            start += batch_size
            n_used += batch_size
        rest = cat[start:]
        buf = [rest] if rest.shape[0] else []
        n_buf = rest.shape[0]
    dropped = 0
    if n_buf:
        if drop_last and n_used:
            dropped = n_buf
        else:
            if n_used == 0:
                warnings.warn(f"only {n_buf} tokens, fewer than one batch of {batch_size}: using one short batch",
                              stacklevel=2)
            yield torch.cat(buf) if len(buf) > 1 else buf[0]
            n_used += n_buf
    if stats is not None:
        stats["n_tokens"] = n_used
        stats["n_dropped_tokens"] = dropped


# ---------------------------------------------------------------------------
# Histogram accumulation
# ---------------------------------------------------------------------------


class EERCalibrator:
    """Streaming accumulator of kept / not-kept histograms; :meth:`result` gives thresholds.

    Accumulation is one ``bincount`` per (sub-)batch on ``latent * n_bins + bin``,
    never a loop over latents.  State is 2 x n_latents x n_bins int64
    (65 MB at n = 20480, 200 bins).
    """

    def __init__(self, n_latents: int, n_bins: int = 200, max_value: float = 10.0, min_selected: int = 100,
                 sub_batch: int = 1024):
        if n_latents <= 0 or n_bins <= 0 or not max_value > 0:
            raise ValueError("n_latents, n_bins and max_value must be positive")
        self.n_latents, self.n_bins, self.max_value = int(n_latents), int(n_bins), float(max_value)
        self.min_selected = int(min_selected)
        self.sub_batch = int(sub_batch)
        self.hist_kept = torch.zeros(n_latents * n_bins, dtype=torch.int64)
        self.hist_notkept = torch.zeros(n_latents * n_bins, dtype=torch.int64)
        self.min_kept = torch.full((n_latents,), math.inf, dtype=torch.float32)
        self.max_notkept = torch.zeros(n_latents, dtype=torch.float32)
        self.n_clamped = torch.zeros(n_latents, dtype=torch.int64)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, pre_BF: torch.Tensor, kept_BF: torch.Tensor) -> None:
        """Add one batch: pre-activations (>= 0) and the BatchTopK keep mask of the same batch."""
        if pre_BF.shape != kept_BF.shape or pre_BF.ndim != 2 or pre_BF.shape[1] != self.n_latents:
            raise ValueError(f"expected two (B x {self.n_latents}) arrays, got {tuple(pre_BF.shape)} "
                             f"and {tuple(kept_BF.shape)}")
        dev = pre_BF.device
        nb = self.n_bins
        width = self.max_value / nb
        offs_F = torch.arange(self.n_latents, device=dev, dtype=torch.int64) * nb
        size = self.n_latents * nb
        hk = torch.zeros(size, dtype=torch.int64, device=dev)
        hn = torch.zeros(size, dtype=torch.int64, device=dev)
        for s in range(0, pre_BF.shape[0], self.sub_batch):
            pre = pre_BF[s:s + self.sub_batch].float()
            kept = kept_BF[s:s + self.sub_batch].bool()
            pos = pre > 0
            k_mask = kept & pos
            n_mask = pos & ~kept
            bins = torch.clamp((pre / width).floor_(), max=nb - 1).to(torch.int64)
            key = bins + offs_F
            hk += torch.bincount(key[k_mask], minlength=size)
            hn += torch.bincount(key[n_mask], minlength=size)
            self.n_clamped += (pos & (pre >= self.max_value)).sum(0).cpu()
            self.min_kept = torch.minimum(
                self.min_kept, torch.where(k_mask, pre, torch.full_like(pre, math.inf)).amin(0).cpu())
            self.max_notkept = torch.maximum(
                self.max_notkept, torch.where(n_mask, pre, torch.zeros_like(pre)).amax(0).cpu())
        self.hist_kept += hk.cpu()
        self.hist_notkept += hn.cpu()
        self.n_tokens += int(pre_BF.shape[0])

    def result(self, batch_size: int = 0, n_dropped_tokens: int = 0) -> EERResult:
        hk = self.hist_kept.view(self.n_latents, self.n_bins).numpy().copy()
        hn = self.hist_notkept.view(self.n_latents, self.n_bins).numpy().copy()
        theta, fallback = eer_from_histograms(hk, hn, self.max_value, self.min_selected,
                                              self.min_kept.numpy(), self.max_notkept.numpy())
        n_clamped = self.n_clamped.numpy().copy()
        if n_clamped.sum():
            frac = n_clamped.sum() / max(1, int(hk.sum() + hn.sum()))
            warnings.warn(f"{int(n_clamped.sum())} positive pre-activations ({frac:.3%}) on "
                          f"{int((n_clamped > 0).sum())} latents were >= max_value={self.max_value} "
                          "and were clamped into the last bin", stacklevel=2)
        return EERResult(
            thresholds_F=theta.astype(np.float32), n_selected_F=hk.sum(1), n_positive_F=hk.sum(1) + hn.sum(1),
            fallback_F=fallback, min_kept_F=self.min_kept.numpy().copy(),
            max_notkept_F=self.max_notkept.numpy().copy(), n_clamped_F=n_clamped, n_tokens=self.n_tokens,
            batch_size=int(batch_size), n_bins=self.n_bins, max_value=self.max_value,
            min_selected=self.min_selected, hist_kept_FH=hk, hist_notkept_FH=hn,
            n_dropped_tokens=int(n_dropped_tokens))


def eer_from_histograms(hist_kept_FH: np.ndarray, hist_notkept_FH: np.ndarray, max_value: float,
                        min_selected: int, min_kept_F: np.ndarray, max_notkept_F: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds (float64) and fallback codes (int8) from per-latent histograms (vectorised)."""
    hk = np.asarray(hist_kept_FH, dtype=np.float64)
    hn = np.asarray(hist_notkept_FH, dtype=np.float64)
    n_lat, nb = hk.shape
    centres = (np.arange(nb) + 0.5) * (max_value / nb)
    tot_k = hk.sum(1, keepdims=True)
    tot_n = hn.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf_k = np.cumsum(hk, 1) / tot_k
        cdf_n = np.where(tot_n > 0, np.cumsum(hn, 1) / np.where(tot_n > 0, tot_n, 1), 1.0)
    gap = np.abs(cdf_k + cdf_n - 1.0)
    gmin = gap.min(1, keepdims=True)
    is_min = gap == gmin
    first = is_min.argmax(1)
    last = nb - 1 - is_min[:, ::-1].argmax(1)
    theta = 0.5 * (centres[first] + centres[last])
    n_sel = hk.sum(1)
    fallback = np.full(n_lat, Fallback.EER, dtype=np.int8)
    rare = (n_sel > 0) & (n_sel < min_selected)
    dead = n_sel == 0
    fallback[rare] = Fallback.RARE
    fallback[dead] = Fallback.DEAD
    theta = np.where(rare, np.maximum(np.asarray(min_kept_F, np.float64), np.asarray(max_notkept_F, np.float64)),
                     theta)
    theta = np.where(dead, np.inf, theta)
    return theta, fallback


@torch.no_grad()
def calibrate_eer_thresholds(sae, batches: Iterable[torch.Tensor], batch_size: int, n_bins: int = 200,
                             max_value: float = 10.0, min_selected: int = 100,
                             max_tokens: int | None = None) -> EERResult:
    """EER thresholds of ``sae`` on calibration activations (SPEC 3.1).

    ``batches`` yields raw (tokens x d) activations; they are re-cut into
    ``batch_size``-token batches so that BatchTopK keeps k * batch_size entries,
    as in training.  ``sae`` needs ``pre_acts(x_BD)`` and ``batch_topk_mask(pre_BF)``.
    ``max_tokens`` stops after that many tokens (whole batches).
    """
    return calibrate_eer_thresholds_many({0: (sae, max_value)}, batches, batch_size, n_bins, min_selected,
                                         max_tokens)[0]


def calibrate_eer_thresholds_many(models: dict, batches: Iterable[torch.Tensor], batch_size: int, n_bins: int = 200,
                                  min_selected: int = 100, max_tokens: int | None = None) -> dict:
    """:func:`calibrate_eer_thresholds` of several SAEs (name -> (sae, max_value)) in one pass over
    ``batches``; each result equals the one-SAE call's on the same batches."""
    cals = {nm: EERCalibrator(int(sae.cfg.n_latents), n_bins, mv, min_selected) for nm, (sae, mv) in models.items()}
    stats: dict = {}
    n_tokens = 0
    for x in rebatch(batches, batch_size, stats=stats):
        if max_tokens is not None and n_tokens >= max_tokens:
            break
        for nm, (sae, _) in models.items():
            xs = x.to(device=_module_device(sae), dtype=torch.float32)
            pre = sae.pre_acts(xs)
            cals[nm].update(pre, sae.batch_topk_mask(pre))
        n_tokens += x.shape[0]
    if n_tokens == 0:
        raise ValueError("no calibration tokens: the activation stream was empty")
    return {nm: cal.result(batch_size=batch_size, n_dropped_tokens=stats.get("n_dropped_tokens", 0))
            for nm, cal in cals.items()}


def _module_device(sae) -> torch.device:
    try:
        return next(sae.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

_ARRAYS = ("thresholds_F", "n_selected_F", "n_positive_F", "fallback_F", "min_kept_F", "max_notkept_F",
           "n_clamped_F")
_SCALARS = ("n_tokens", "batch_size", "n_bins", "max_value", "min_selected", "n_dropped_tokens")


def thresholds_path(checkpoint_dir: str | Path) -> Path:
    """Where the thresholds of the SAE saved in ``checkpoint_dir`` live."""
    return Path(checkpoint_dir) / THRESHOLDS_FILE


def save_eer_thresholds(result: EERResult, path: str | Path, include_hist: bool = False) -> Path:
    """Write ``result`` as safetensors (atomically); histograms only if ``include_hist``."""
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(getattr(result, name)) for name in _ARRAYS}
    if include_hist and result.hist_kept_FH is not None:
        tensors["hist_kept_FH"] = np.ascontiguousarray(result.hist_kept_FH)
        tensors["hist_notkept_FH"] = np.ascontiguousarray(result.hist_notkept_FH)
    meta = {name: repr(getattr(result, name)) for name in _SCALARS}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_eer_thresholds(path: str | Path) -> EERResult:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; compute it with calibrate_eer_thresholds and "
                                "save_eer_thresholds")
    with safe_open(str(path), framework="numpy") as fh:
        meta = fh.metadata() or {}
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    scalars = {}
    for name in _SCALARS:
        v = meta.get(name, "0")
        scalars[name] = float(v) if name == "max_value" else int(v)
    return EERResult(**{n: arrays[n] for n in _ARRAYS}, hist_kept_FH=arrays.get("hist_kept_FH"),
                     hist_notkept_FH=arrays.get("hist_notkept_FH"), **scalars)
