"""Throughput of the exact all-pairs |phi| computation (SPEC 3.2) on synthetic sparse firing.

    python benchmarks/phi.py [--n 20480] [--l0 64] [--tokens 100000] [--chunk 4096]

Firing is random: per token about L0 latents drawn from log-normal firing
rates (duplicates dropped), so pair counts have a realistic skew.  Reports the
counting throughput (tokens/s; the firing generation is not timed), the time
of the final all-pairs pass, the accumulator's memory, and the extrapolated
time for the paper's 35M-token scan.  Prints JSON, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metasae.metrics.cooccurrence import CoFiringCounts, FiringChunk, phi_summary  # noqa: E402

PAPER_TOKENS = 35_000_000


def synthetic_chunk(rng: np.random.Generator, cdf: np.ndarray, n_tokens: int, l0: int) -> FiringChunk:
    draws = np.searchsorted(cdf, rng.random((n_tokens, l0)), side="right").clip(max=cdf.size - 1)
    draws.sort(axis=1)
    keep = np.ones_like(draws, dtype=bool)
    keep[:, 1:] = draws[:, 1:] != draws[:, :-1]
    indptr = np.zeros(n_tokens + 1, dtype=np.int64)
    np.cumsum(keep.sum(1), out=indptr[1:])
    return FiringChunk(indptr, draws[keep].astype(np.int32), cdf.size)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20480)
    ap.add_argument("--l0", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    rates = rng.lognormal(0.0, 1.0, args.n)
    cdf = np.cumsum(rates / rates.sum())

    t0 = time.perf_counter()
    counts = CoFiringCounts(args.n)
    counts.N11_packed.fill(0)  # touch the pages now, not inside the timed loop
    t_alloc = time.perf_counter() - t0

    t_count = t_gen = 0.0
    nnz = 0
    done = 0
    while done < args.tokens:
        m = min(args.chunk, args.tokens - done)
        g0 = time.perf_counter()
        ch = synthetic_chunk(rng, cdf, m, args.l0)
        g1 = time.perf_counter()
        counts.update(ch)
        t_count += time.perf_counter() - g1
        t_gen += g1 - g0
        nnz += ch.nnz
        done += m

    p0 = time.perf_counter()
    summary = phi_summary(counts)
    t_pass = time.perf_counter() - p0

    tps = done / t_count
    res = {
        "n_latents": args.n,
        "target_l0": args.l0,
        "mean_l0": nnz / done,
        "tokens": done,
        "chunk_tokens": args.chunk,
        "torch_threads": args.threads,
        "count_seconds": t_count,
        "tokens_per_second": tps,
        "generation_seconds_untimed": t_gen,
        "accumulator_alloc_seconds": t_alloc,
        "accumulator_gb": counts.nbytes / 1e9,
        "all_pairs_pass_seconds": t_pass,
        "n_pairs": summary.n_pairs,
        "mean_abs_phi": summary.mean_abs_phi,
        "paper_tokens": PAPER_TOKENS,
        "extrapolated_paper_seconds": PAPER_TOKENS / tps + t_pass,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    print(json.dumps(res, indent=2))
    print()
    print("| n | mean L0 | tokens | counting tokens/s | all-pairs pass (s) | pairs | accumulator (GB) "
          "| extrapolated 35M tokens (min) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.n} | {res['mean_l0']:.1f} | {done} | {tps:,.0f} | {t_pass:.1f} | {summary.n_pairs:,} "
          f"| {res['accumulator_gb']:.2f} | {res['extrapolated_paper_seconds'] / 60:.0f} |")
    return res


if __name__ == "__main__":
    main()
