"""Reconstruction quality under the inference rule (SPEC 3.3-3.5; paper §5.3, App. B, D).

* ``mse``: mean squared error over tokens and dims in the *standardised*
  space, the quantity the paper calls L2 (solo 0.097 on GPT-2 large).
* ``explained_variance``: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 in raw
  space, with mean(x) the split's mean vector (SAELens' name; SAELens
  averages a per-batch version, ours pools the split).
* ``l0``: mean latents firing per token (pre > threshold); ``dead``: latents
  that never fire on the split; ``firing_rates``: per latent.
* CE numbers come from ``metasae.activations.harvest.ce_with_splice``;
  :func:`ce_summary` turns them into the SAELens / SAEBench scores.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import torch

from metasae.metrics.cooccurrence import resolve_thresholds, _module_device


@torch.no_grad()
def reconstruction_metrics(sae, batches: Iterable[torch.Tensor], thresholds=None,
                           max_tokens: int | None = None, counts=None) -> dict:
    """MSE, explained variance, L0, dead latents, firing rates and norms of ``sae`` on ``batches``.

    ``thresholds``: None (the SAE's global threshold), an EERResult, or a per-latent array.
    Per-latent thresholds are passed to ``sae.reconstruct`` / ``sae.mse_standardized``.
    An SAE with ``evaluate_batch`` (metasae's BatchTopKSAE) is read with one
    encoder pass per batch, which also gives ``mse_batchtopk`` (the training
    rule over each batch: pass batches of the training batch size) and, when
    ``counts`` (a CoFiringCounts) is given, accumulates its co-firing counts.
    """
    return reconstruction_metrics_many({0: (sae, thresholds, counts)}, batches, max_tokens)[0]


@torch.no_grad()
def reconstruction_metrics_many(models: Mapping, batches: Iterable[torch.Tensor],
                                max_tokens: int | None = None) -> dict:
    """:func:`reconstruction_metrics` of several SAEs in one pass over ``batches``.

    ``models`` maps a name to ``(sae, thresholds, counts)``; returns ``{name: metrics}``,
    each exactly what :func:`reconstruction_metrics` gives that SAE on the same batches
    (each SAE's sums run over the batches in the same order).  A streamed split is
    harvested once for all of them.
    """
    accs = {nm: _Recon(sae, thr, counts) for nm, (sae, thr, counts) in models.items()}
    n_tok = 0
    for x in batches:
        if max_tokens is not None and n_tok >= max_tokens:
            break
        if max_tokens is not None:
            x = x[:max_tokens - n_tok]
        for acc in accs.values():
            acc.update(x)
        n_tok += x.shape[0]
    return {nm: acc.result() for nm, acc in accs.items()}


class _Recon:
    """The running sums of :func:`reconstruction_metrics` for one SAE."""

    def __init__(self, sae, thresholds=None, counts=None):
        self.sae, self.thresholds, self.counts = sae, thresholds, counts
        self.device = _module_device(sae)
        self.theta = resolve_thresholds(sae, thresholds).to(self.device)
        self.thr_arg = None if thresholds is None else self.theta
        self.fused = hasattr(sae, "evaluate_batch")
        self.n_lat = int(sae.cfg.n_latents)
        self.fire_counts = torch.zeros(self.n_lat, dtype=torch.int64)
        self.n_tok = 0
        self.sse_std = self.sse_btk = self.sse_eer = 0.0
        self.l0_thr = 0
        self.sn1 = None
        self.sn2 = 0.0
        self.n_elem = 0
        self.rss = 0.0
        self.s1 = None
        self.s2 = 0.0
        self.norm_x = self.norm_hat = 0.0

    def update(self, x: torch.Tensor) -> None:
        sae = self.sae
        x = x.to(device=self.device, dtype=torch.float32)
        B, D = x.shape
        if self.fused:
            out = sae.evaluate_batch(x, self.theta)
            fired, x_hat = out["fired_BF"], out["x_hat_BD"].float()
            self.sse_std += float(out["sse_threshold"])
            self.sse_btk += float(out["sse_batchtopk"])
            self.sse_eer += float(out["sse_eer"])
            self.l0_thr += int(out["l0_threshold"])
            self.sn1 = out["sum_xn"] if self.sn1 is None else self.sn1 + out["sum_xn"]
            self.sn2 += float(out["sum_xn2"])
        else:
            fired = sae.pre_acts(x) > self.theta
            x_hat = sae.reconstruct(x, self.thr_arg).float()
            self.sse_std += float(sae.mse_standardized(x, self.thr_arg)) * B * D
        self.fire_counts += fired.sum(0).cpu()
        if self.counts is not None:
            self.counts.update_fired(fired)  # dense F^T F on a GPU, sparse on the CPU
        self.n_elem += B * D
        x64 = x.double()
        self.rss += float(((x64 - x_hat.double()) ** 2).sum())
        self.s1 = x64.sum(0) if self.s1 is None else self.s1 + x64.sum(0)
        self.s2 += float((x64 ** 2).sum())
        self.norm_x += float(x64.norm(dim=1).sum())
        self.norm_hat += float(x_hat.double().norm(dim=1).sum())
        self.n_tok += B

    def result(self) -> dict:
        n_tok, n_elem = self.n_tok, self.n_elem
        if n_tok == 0:
            raise ValueError("no tokens: the activation stream was empty")
        tss = self.s2 - float((self.s1 ** 2).sum()) / n_tok
        fc = self.fire_counts.numpy()
        out = {
            "n_tokens": n_tok,
            "mse": self.sse_std / n_elem,
            "explained_variance": 1.0 - self.rss / tss if tss > 0 else float("nan"),
            "l0": float(fc.sum()) / n_tok,
            "dead": int((fc == 0).sum()),
            "frac_alive": float((fc > 0).mean()),
            "firing_counts": fc,
            "firing_rates": fc / n_tok,
            "mean_norm_x": self.norm_x / n_tok,
            "mean_norm_x_hat": self.norm_hat / n_tok,
            "threshold_rule": "global" if self.thresholds is None else "per_latent",
        }
        if self.fused:
            # one rule for every reconstruction metric: the SAE's global inference threshold
            out["reconstruction_rule"] = "global threshold (L0 = k on held-out tokens)"
            out["mse_eer"] = self.sse_eer / n_elem
            out["mse_batchtopk"] = self.sse_btk / n_elem
            out["l0_threshold"] = self.l0_thr / n_tok
            tss_std = self.sn2 - float((self.sn1 ** 2).sum()) / n_tok
            out["explained_variance_std"] = 1.0 - self.sse_std / tss_std if tss_std > 0 else float("nan")
            out["dead_frac"] = out["dead"] / self.n_lat
        return out


def delta_pct(joint: float, solo: float) -> float:
    """100 (joint - solo) / solo; nan when solo is 0 or either is not finite."""
    if not (math.isfinite(joint) and math.isfinite(solo)) or solo == 0:
        return float("nan")
    return 100.0 * (joint - solo) / solo


def ce_summary(d: Mapping[str, float]) -> dict:
    """CE scores from ``ce_with_splice`` output (clean_ce, spliced_ce, zero_ce, kl_spliced, kl_zero).

    * ``delta_ce_pct`` = 100 (spliced - clean) / clean: the paper's Delta CE %.
    * ``ce_loss_score`` = (zero - spliced) / (zero - clean): fraction of CE
      recovered relative to zero-ablating the site (SAEBench / SAELens name).
    * ``frac_ce_destroyed`` = (spliced - clean) / (zero - clean) = 1 - ce_loss_score
      (the paper's draft "fraction destroyed").
    * ``kl_div_score`` = (kl_zero - kl_spliced) / kl_zero (SAEBench name).
    """
    clean, spliced, zero = float(d["clean_ce"]), float(d["spliced_ce"]), float(d["zero_ce"])
    out = {k: d[k] for k in d}
    out["ce_increase"] = spliced - clean
    out["delta_ce_pct"] = 100.0 * (spliced - clean) / clean if clean else float("nan")
    gap = zero - clean
    out["ce_loss_score"] = (zero - spliced) / gap if gap else float("nan")
    out["frac_ce_destroyed"] = (spliced - clean) / gap if gap else float("nan")
    if "kl_spliced" in d and "kl_zero" in d:
        kz = float(d["kl_zero"])
        out["kl_div_score"] = (kz - float(d["kl_spliced"])) / kz if kz else float("nan")
    return out
