"""Train a profile's SAEs data parallel under torchrun (:mod:`metasae.distributed`).

    torchrun --nproc-per-node 8 -m metasae.train_dist --profile gpt2-large [--seeds 0] [--out DIR]

Every rank trains the same SAEs of each seed on its rows of every global batch
(``train.batch_size`` is the global batch; it must split evenly over the ranks).
Rank 0 builds the activation cache first when it is missing.  The checkpoints land
where ``bash run_all.sh`` looks for them, so a later ``bash run_all.sh --profile P``
(same ``--out``) finds the SAEs trained and goes on with the metrics.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m metasae.train_dist",
                                description="Data-parallel training of a profile's SAEs (NCCL on GPUs, Gloo on CPU).")
    p.add_argument("--profile", required=True, help="profile name (profiles/<name>.toml) or path")
    p.add_argument("--seeds", default=None, help="comma-separated seeds; default: the profile's")
    p.add_argument("--out", default="", help="output folder; default: outputs/<profile>")
    p.add_argument("--figures", default="", help="figures folder; default: figures/<profile>")
    args = p.parse_args(argv)
    from metasae import distributed, pipeline
    from metasae.config import ConfigError

    try:
        from metasae.config import load_profile, parse_seeds

        profile = load_profile(args.profile, parse_seeds(args.seeds) if args.seeds else None)  # validated first
        if distributed.world_from_env() is None:
            raise distributed.DistributedError("run this under torchrun (torchrun --nproc-per-node N -m "
                                               "metasae.train_dist ...); RANK and WORLD_SIZE are not set")
        B = profile.train.batch_size
        world = distributed.world_from_env()[1]  # type: ignore[index]
        if B % world:
            raise distributed.DistributedError(f"train.batch_size ({B}) must be a multiple of the number of "
                                               f"processes ({world}): it is the global batch")
        import os

        import torch

        from metasae.trainer import resolve_device

        device = resolve_device(profile.train.device)
        if device.type == "cuda":  # one GPU per rank: "cuda" then means this rank's device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist = distributed.init(device)
        ctx = pipeline.open_run(args.profile, args.out, args.figures, seeds=args.seeds)
    except (ConfigError, distributed.DistributedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for seed in ctx.profile.seeds:
        pipeline.train_seed(ctx, seed, progress=True, dist=dist)
    dist.barrier()  # type: ignore[union-attr]
    return 0


if __name__ == "__main__":
    sys.exit(main())
