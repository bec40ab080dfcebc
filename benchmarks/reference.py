"""Dense float32 reference of the training math (benchmarks only, not the library).

The straightforward implementation, written the way the paper's code is:
dense pre-activations with autograd through the full B x n encoder matmul,
a dense BatchTopK mask, a dense decode ``acts @ W_dec``, and the meta SAE's
forward recomputed at every primary step.  Same loss, same schedule, same
init as :class:`metasae.sae.BatchTopKSAE` (weights are copied from one), so
``benchmarks/train.py`` can run it side by side with the library and compare
both speed and the final loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-5


class DenseSAE:
    """BatchTopK SAE, dense everywhere (float32, no autocast)."""

    def __init__(self, like):  # like: metasae.sae.BatchTopKSAE (for cfg and init)
        c = like.cfg
        self.k, self.aux_k, self.aux_coef = c.k, c.aux_k, c.aux_coef
        self.dead_after, self.standardize_inputs = c.dead_after_tokens, c.input_norm == "standardize"
        self.W_enc = like.W_enc_DF.detach().clone().requires_grad_()
        self.W_dec = like.W_dec_FD.detach().clone().requires_grad_()
        self.b_dec = like.b_dec_D.detach().clone().requires_grad_()
        self.since_fired = torch.zeros(c.n_latents, dtype=torch.long)
        self.opt = torch.optim.Adam([self.W_enc, self.W_dec, self.b_dec], lr=c.lr, betas=(c.beta1, c.beta2))

    def standardize(self, x: Tensor):
        if not self.standardize_inputs:
            return x, 0.0, 1.0
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        return xc / (std + EPS), mu, std

    def loss(self, x: Tensor):
        x_n, _, _ = self.standardize(x)
        B, n = x_n.shape[0], self.W_enc.shape[1]
        pre = torch.relu((x_n - self.b_dec) @ self.W_enc)  # dense, autograd through B x n
        kk = min(self.k * B, B * n)
        idx = torch.topk(pre.reshape(-1), kk, sorted=False).indices
        mask = torch.zeros(B * n, dtype=pre.dtype)
        mask[idx] = 1.0
        acts = pre * mask.view(B, n)
        x_hat = acts @ self.W_dec + self.b_dec  # dense decode
        mse = (x_hat - x_n).pow(2).mean()
        dead = self.since_fired >= self.dead_after
        aux = mse.new_zeros(())
        n_dead = int(dead.sum())
        if n_dead > 0 and self.aux_k > 0 and self.aux_coef > 0:
            k_aux = min(self.aux_k, n_dead)
            pre_dead = pre * dead.to(pre.dtype) - (~dead).to(pre.dtype)  # live latents can never win
            top = torch.topk(pre_dead, k_aux, dim=1)
            aux_acts = torch.zeros_like(pre).scatter(1, top.indices, 1.0) * pre * dead.to(pre.dtype)
            recon = aux_acts @ self.W_dec
            aux = self.aux_coef * (recon - (x_n - x_hat).detach()).pow(2).mean()
        with torch.no_grad():
            fired = (acts > 0).any(0)
            self.since_fired += B
            self.since_fired[fired] = 0
        return mse + aux, mse

    def step(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g, W = self.W_dec.grad, self.W_dec
            g.sub_((g * W).sum(1, keepdim=True) * W)
        self.opt.step()
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def reconstruct_no_grad(self, x: Tensor) -> Tensor:
        """The meta SAE's output on x (BatchTopK over the whole batch), no statistics updated."""
        x_n, mu, std = self.standardize(x)
        B, n = x_n.shape[0], self.W_enc.shape[1]
        pre = torch.relu((x_n - self.b_dec) @ self.W_enc)
        idx = torch.topk(pre.reshape(-1), min(self.k * B, B * n), sorted=False).indices
        mask = torch.zeros(B * n)
        mask[idx] = 1.0
        y = (pre * mask.view(B, n)) @ self.W_dec + self.b_dec
        return y * std + mu if self.standardize_inputs else y


class DenseJoint:
    """Primary + meta, the paper's schedule; W_hat recomputed at every primary step."""

    def __init__(self, primary_like, meta_like=None, lambda2: float = 0.0, sigma2: float = 1.0):
        self.primary = DenseSAE(primary_like)
        self.meta = DenseSAE(meta_like) if meta_like is not None else None
        self.lambda2, self.sigma2 = lambda2, sigma2

    def primary_step(self, x: Tensor) -> float:
        loss, _ = self.primary.loss(x)
        if self.meta is not None and self.lambda2 > 0:
            W_hat = self.meta.reconstruct_no_grad(self.primary.W_dec.detach())
            p = torch.exp(-(self.primary.W_dec - W_hat).pow(2).sum(1) / self.sigma2)
            loss = loss + self.lambda2 * p.mean()
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError("non-finite loss in the dense reference")
        self.primary.step(loss)
        return float(loss.detach())

    def meta_step(self) -> float:
        assert self.meta is not None
        loss, _ = self.meta.loss(self.primary.W_dec.detach())
        self.meta.step(loss)
        return float(loss.detach())
