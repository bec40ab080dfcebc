"""Int8 linear layers for a local judge on a CPU (``autointerp.local_int8``).

A local judge spends its time in the matrix products of its linear layers, at the CPU's
bf16 GEMM rate; int8 products (AVX-512 VNNI, AMX-INT8) run at about twice that rate.
:class:`Int8Linear` keeps a layer's weight as int8 with one scale per output channel and
quantises its input per token (one scale per row, symmetric, round to nearest), multiplies
with ``torch._int_mm`` (int32 sums, exact) and scales the result back to the input's dtype.
Per-token scales matter: a judge's inputs carry a few channels far larger than the rest
(up to 300x the median at the MLP's output projection), and one scale per call, as
``torch.ao.quantization.quantize_dynamic`` uses, loses most of the others (35% relative
error on that layer against 4.5% per token; ``benchmarks/judge_int8.py``).
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """``nn.Linear``'s forward with int8 weights (per output channel) and int8 activations
    (per token): ``y = (round(x / s_x) @ round(W / s_W)^T) * s_x * s_W + b``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.register_buffer("weight_t", torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).t()
                             .contiguous())
        self.register_buffer("weight_scale", scale.reshape(1, -1))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m, k, n = x2.shape[0], x2.shape[1], self.out_features
        # one scale per token: the largest |x| of its row (two reductions: no |x| tensor is made)
        s = torch.maximum(x2.amax(dim=1, keepdim=True), x2.amin(dim=1, keepdim=True).neg_()).float()
        s = s.clamp_min_(1e-12).div_(127.0)
        # the int8 input and the int32 sums live in buffers kept between calls: a fresh M x N tensor
        # costs a page fault per 4 KiB, and at a prompt's size those cost as much as the arithmetic
        xf = _workspace("float", m * k, torch.float32).view(m, k)
        torch.div(x2, s, out=xf).round_()
        xq = _workspace("int8", m * k, torch.int8).view(m, k)
        xq.copy_(xf)
        acc = _workspace("int32", m * n, torch.int32).view(m, n)
        torch._int_mm(xq, self.weight_t, out=acc)
        # scaled back in the input's dtype: in bf16 the int32 sums round to 8 bits (0.4% relative error,
        # a third of the int8 inputs' own) and the passes over the M x N result move a third of the
        # bytes that float32 would
        y = torch.empty(m, n, dtype=x.dtype)
        y.copy_(acc).mul_(s.to(x.dtype)).mul_(self.weight_scale.to(x.dtype))
        if self.bias is not None:
            y.add_(self.bias.to(y.dtype))
        return y.reshape(*shape[:-1], n)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


_WORKSPACE: dict[str, torch.Tensor] = {}
"""Scratch buffers of :meth:`Int8Linear.forward`, by use, grown to the largest call so far (one
process runs one judge: its layers use them one after the other, never at once).  With the 1.5B
judge and 8 explainer prompts of ~1,000 tokens they hold about 650 MB for the process's life."""


def _workspace(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = _WORKSPACE.get(name)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACE[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Every ``nn.Linear`` of ``model`` replaced in place by an :class:`Int8Linear`, except modules whose
    name ends with one of ``skip`` (the output layer: a judge reads one position of it per prompt).
    Returns how many were replaced."""
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"local_int8: the int8 layers run on a CPU, and this model is on {sorted(devices - {'cpu'})}")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith(skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(getattr(parent, child)))
    return len(names)
