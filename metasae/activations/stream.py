"""Training batches straight from the language model, through a mixing buffer (no train split on disk).

A profile with ``data.stream_splits = ["train"]`` keeps the training split's token ids
and mask in the activation cache (5 bytes a token) but not its activations (d x 2 bytes
a token: 370 GB for GPT-2 large's 145M tokens).  :func:`stream_batches` harvests them
while training, as SAELens and sparsify do:

* rows of the split are visited in a permutation drawn from ``(seed, epoch)``; each chunk
  of ``harvest_rows`` rows goes through the model (resid_pre of the hooked block, rounded
  to the cache's dtype so that a streamed and a cached run see the same values), and its
  valid, non-massive positions enter a buffer;
* when the buffer holds ``buffer_tokens`` it is shuffled with a generator drawn from
  ``(seed, fill)``, and its first half leaves as batches of ``batch_size``; the second
  half stays and the next rows refill it (so up to half a buffer crosses from one pass
  over the rows into the next: over a run, each position is seen epochs times, give or
  take one);
* exactly ``n_batches`` batches come out (:func:`planned_batches`: epochs x the valid
  tokens, as the cached path); when the tokens left out as massive make a pass shorter
  than planned, the stream goes on into the next pass, so a run never stops short.

Every SAE of a seed sees the same batches in the same order (the trainer fans one batch
out to all of them).  Under data parallelism (``shard = (rank, world)``) each process
harvests only its own rows (every ``world``-th row from ``rank``), through its own
buffer with generators drawn from ``(seed, epoch, rank, world)``, and yields its part
(``batch_size`` = the global batch / world) of each global batch: the union of the ranks'
batches visits every position epochs times, give or take what a buffer carries over a
pass boundary (more per rank, since a rank's buffer is a larger share of its rows), but the global batches
are not the ones one process would draw (they are equal in distribution, not bitwise).
``shard = (0, 1)`` is the one-process stream, unchanged.

``start_batch`` resumes by replaying the stream from its start and dropping the first
``start_batch`` batches: the resumed batches equal the uninterrupted
ones bitwise wherever the harvest is deterministic (it is on CPU; on a GPU, kernels may
differ in the last bits between runs), at the cost of harvesting the skipped tokens again.
The trainer never sees the language model: it receives an iterator of batches.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import numpy as np
import torch

def stream_batches(loaded: Any, layer: int, tokens_RT: torch.Tensor, mask_RT: torch.Tensor, *, batch_size: int,
                   seed: int, n_batches: int, buffer_tokens: int = 262144,
                   harvest_rows: int = 16, cache_dtype: torch.dtype = torch.bfloat16,
                   exclude_above: float = float("inf"), start_batch: int = 0,
                   harvest: Any = None, shard: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
    """Yield batches ``start_batch .. n_batches - 1`` (float32, batch_size x d) of the stream.

    ``harvest`` (rows x T token ids -> rows x T x d activations) defaults to the
    model's resid_pre of block ``layer``; tests pass a stand-in.  ``shard`` = (rank, world):
    this process's rows only (see the module's docstring).
    """
    if batch_size < 1 or n_batches < 0 or start_batch < 0:
        raise ValueError("batch_size must be positive and n_batches, start_batch non-negative")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {shard} is not (rank, world) with 0 <= rank < world")
    if world > 1:  # this rank's rows; its own generators (the one-process stream is left as it was)
        tokens_RT, mask_RT = tokens_RT[rank::world], mask_RT[rank::world]
    key = [rank, world] if world > 1 else []
    if buffer_tokens < 2 * batch_size:
        raise ValueError(f"buffer_tokens ({buffer_tokens}) must hold at least two batches ({2 * batch_size})")
    if harvest is None:
        from metasae.activations.harvest import read_resid_pre

        def harvest(tok: torch.Tensor) -> torch.Tensor:
            return read_resid_pre(loaded, layer, tok)

    R = int(tokens_RT.shape[0])
    mask = mask_RT.bool()
    emitted = 0
    parts: list[torch.Tensor] = []  # the buffer, as the chunks that filled it (one copy per drain)
    held = fills = 0
    for epoch in itertools.count():  # passes over the rows until n_batches are out
        order = np.random.default_rng([seed, epoch, *key]).permutation(R)
        added = 0
        for i in range(0, R, harvest_rows):
            rows = torch.as_tensor(np.sort(order[i:i + harvest_rows]))
            with torch.no_grad():
                x = harvest(tokens_RT[rows].long()).to(cache_dtype)[mask[rows]]  # held in the cache's dtype
            if math.isfinite(exclude_above):
                x = x[x.float().norm(dim=1) <= exclude_above]
            added += x.shape[0]
            parts.append(x)
            held += x.shape[0]
            if held < buffer_tokens:
                continue
            g = torch.Generator().manual_seed(int(np.random.default_rng([seed, fills, *key]).integers(2 ** 62)))
            fills += 1
            buf = torch.cat(parts)
            buf = buf[torch.randperm(buf.shape[0], generator=g)]
            n_out = (buf.shape[0] - buf.shape[0] // 2) // batch_size
            for j in range(n_out):
                if emitted >= n_batches:
                    return
                if emitted >= start_batch:
                    yield buf[j * batch_size:(j + 1) * batch_size].float()
                emitted += 1
            parts = [buf[n_out * batch_size:].clone()]
            held = parts[0].shape[0]
            if emitted >= n_batches:
                return
        if added == 0:
            raise ValueError("the streamed split has no valid positions (below the massive-activation cut)")


def planned_batches(n_valid: int, epochs: float, batch_size: int, massive_frac: float = 0.0) -> int:
    """The batches of a streamed run: its valid tokens less the massive share measured on the
    calibration split (the training split's own share is unknown until harvested), times the
    epochs, in whole batches; the cached path's floor(epochs x N) / B with N estimated."""
    kept = n_valid * max(0.0, 1.0 - massive_frac)
    return int(math.floor(kept * epochs)) // batch_size
