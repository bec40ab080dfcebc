"""Data parallelism for the trainer over ``torch.distributed`` (NCCL on GPUs, Gloo on CPU).

Launched by ``torchrun``, every rank trains the same SAEs on its own shard of each
global batch: rank r of R gets rows ``[r B/R, (r+1) B/R)`` of global batch t, where
B = ``train.batch_size`` is the *global* batch (of a streamed training split, each
rank instead harvests its own rows and trains on its B/R tokens of them:
metasae.activations.stream, ``shard``).  What is promised (and tested with
two Gloo processes, ``tests/test_distributed.py``):

* **BatchTopK's budget is global**: k x B activations per global batch, chosen
  over all ranks' tokens together.  Each rank sends its top k x B pre-activations
  (no rank can hold more of the global top k x B than that), all ranks find the
  same global threshold, and each keeps its own entries above it; the set is the
  one a single process would keep for the whole batch (up to the choice among
  tied values, which ``torch.topk`` leaves unspecified too).
* **Gradients are averaged** over ranks (every rank's loss is a mean over its
  B/R tokens, so the average is the gradient of the global mean); the
  decomposability and orthogonality penalties depend only on the weights and
  are the same on every rank, so they pass through the average unchanged.
* **Dead-latent counters and the inference-threshold EMA** are kept global: a
  latent has fired if it fired on any rank, and the smallest kept activation is
  the minimum over ranks.
* The meta SAE steps read only the (identical) primary decoder, so every rank
  runs them on the same input; weights stay bitwise equal on all ranks.
* In fp32 (``train.autocast = "none"``) two processes end 12 steps equal to one
  process with the same global batches to about 1e-8 (summation order), with the
  same dead-latent counters and threshold: tested.  Under bf16 autocast (the
  default) the pre-activations are bf16 and often tie at the BatchTopK boundary;
  which tied entries are kept can differ, as it can between two batch shapes in
  one process, and the runs then drift apart as any two float orderings do.
* The loss history is the global mean (the ranks' means averaged).
* Checkpoints are written by rank 0 only; every rank resumes from the same
  commit, at the same data position.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Iterable

import torch


class DistributedError(RuntimeError):
    """torchrun's world settings are inconsistent, or the batch does not split over the ranks."""


@dataclass
class DistContext:
    rank: int
    world_size: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives ----------------------------------------------------------
    def all_reduce_mean_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Average each tensor over the ranks, in place (one flat buffer per dtype)."""
        import torch.distributed as dist

        ts = [t for t in tensors if t is not None]
        if self.world_size == 1 or not ts:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in ts:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            off = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[off:off + n].view_as(t))
                off += n

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over the ranks of equally shaped 1-D tensors."""
        import torch.distributed as dist

        if self.world_size == 1:
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out)

    def all_reduce_(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """In-place ``max`` / ``min`` / ``sum`` over the ranks (returns ``t``)."""
        import torch.distributed as dist

        if self.world_size > 1:
            dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
                                   "sum": dist.ReduceOp.SUM}[op])
        return t

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()

    def shard(self, x_BD: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch."""
        B = x_BD.shape[0]
        if B % self.world_size:
            raise DistributedError(f"a global batch of {B} rows does not split over {self.world_size} ranks; "
                                   f"make train.batch_size a multiple of the number of processes")
        b = B // self.world_size
        return x_BD[self.rank * b:(self.rank + 1) * b]


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"{name}={v!r} is not a whole number (set by torchrun)") from None


def world_from_env() -> tuple[int, int] | None:
    """(rank, world size) from torchrun's environment, validated; None outside torchrun."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        raise DistributedError("torchrun sets both RANK and WORLD_SIZE; only one of them is set")
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} is not a rank of WORLD_SIZE={world}")
    local, local_world = _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE")
    if local_world is not None and (local_world < 1 or world % local_world):
        raise DistributedError(f"LOCAL_WORLD_SIZE={local_world} does not divide WORLD_SIZE={world}: "
                               f"every node must run the same number of processes")
    if local is not None and local_world is not None and not 0 <= local < local_world:
        raise DistributedError(f"LOCAL_RANK={local} is not a rank of LOCAL_WORLD_SIZE={local_world}")
    return rank, world


def init(device: torch.device | str = "cpu", timeout_s: float = 600.0) -> DistContext | None:
    """Join torchrun's process group (NCCL for CUDA devices, else Gloo); None outside torchrun."""
    import datetime

    import torch.distributed as dist

    w = world_from_env()
    if w is None:
        return None
    rank, world = w
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistributedError(f"{name} is not set; launch with torchrun, which sets it")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        # left to the interpreter's teardown, Gloo's threads may abort the process as it exits
        # ("terminate called without an active exception"): the group is destroyed first
        atexit.register(_destroy)
    return DistContext(rank, world, backend)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistContext", "DistributedError", "init", "world_from_env"]
