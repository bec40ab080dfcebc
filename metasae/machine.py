"""How fast this machine is right now: a short probe recorded before and after a run.

A shared CPU machine's speed drifts by 10-50% from hour to hour (ENVIRONMENT.md), so a
run's wall time means little without the speed it ran at.  :func:`probe` starts as many
one-thread processes as the run's ``--jobs`` (the layout the notebooks run in), side by
side, and each measures

* ``bf16_gemm_gflops``: the best of 3 bfloat16 products 4096 x 1280 @ 1280 x 20480, the
  shape of ``benchmarks/fanout.py --gemm`` (compute-bound, as the encoder GEMMs); and
* ``mem_triad_gbps``: the best of 5 float32 triads a = b + s c over 3 x 128 MiB (memory-bound,
  as most of an SAE step on this CPU: sparse decode, selection, Adam), counting 12 bytes
  per element.

The record holds the sums over the processes and each process's own figures.  The probe
takes a few seconds, is never fatal (a failure is recorded as ``error``) and is skipped
with ``METASAE_MACHINE_PROBE=0``.

    python -m metasae.machine [--processes 2]      # print one probe as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any

GEMM_SHAPE = (4096, 1280, 20480)
TRIAD_ELEMENTS = 1 << 25  # 128 MiB per float32 array: far beyond any cache
PROBE_ENV = "METASAE_MACHINE_PROBE"
TIMEOUT_S = 120.0


def gemm_gflops(reps: int = 3) -> float:
    """bfloat16 GEMM GFLOP/s in this process (best of ``reps`` after one warm-up)."""
    import torch

    m, k, n = GEMM_SHAPE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(k, n, generator=g).to(torch.bfloat16)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def triad_gbps(reps: int = 5, elements: int = TRIAD_ELEMENTS) -> float:
    """float32 triad a = b + 0.5 c in this process, GB/s (best of ``reps`` after one warm-up)."""
    import torch

    b = torch.ones(elements)
    c = torch.full((elements,), 2.0)
    a = torch.empty(elements)
    torch.add(b, c, alpha=0.5, out=a)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.add(b, c, alpha=0.5, out=a)
        best = min(best, time.perf_counter() - t)
    return 3 * 4 * elements / best / 1e9


def _worker() -> None:
    import torch

    torch.set_num_threads(1)
    print(json.dumps({"bf16_gemm_gflops": gemm_gflops(), "mem_triad_gbps": triad_gbps()}))


def enabled(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(PROBE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def probe(processes: int = 2, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """One probe: ``processes`` one-thread workers side by side.  Returns ``at`` (UTC),
    ``processes``, ``threads_each``, ``bf16_gemm_gflops`` and ``mem_triad_gbps`` (sums),
    ``per_process`` and ``loadavg`` (before the probe); on failure ``error`` instead of the
    figures."""
    processes = max(int(processes), 1)
    rec: dict[str, Any] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "processes": processes, "threads_each": 1,
                           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, "-m", "metasae.machine", "--worker"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
        per = []
        for p in procs:
            out, err = p.communicate(timeout=max(timeout - (time.perf_counter() - t0), 1.0))
            if p.returncode != 0:
                last = (err.strip().splitlines() or ["no message"])[-1]
                raise RuntimeError(f"a probe worker exited with status {p.returncode}: {last}")
            per.append(json.loads(out.strip().splitlines()[-1]))
    except (OSError, ValueError, IndexError, RuntimeError, subprocess.SubprocessError) as e:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        rec["error"] = str(e) or type(e).__name__
        return rec
    rec["bf16_gemm_gflops"] = round(sum(r["bf16_gemm_gflops"] for r in per), 1)
    rec["mem_triad_gbps"] = round(sum(r["mem_triad_gbps"] for r in per), 2)
    rec["per_process"] = [{k: round(v, 2) for k, v in r.items()} for r in per]
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def describe(rec: Any) -> str:
    """'1,319 GFLOP/s bf16 GEMM, 21.4 GB/s memory (2 x 1 thread)', or '' without figures."""
    if not isinstance(rec, dict) or rec.get("bf16_gemm_gflops") is None or rec.get("mem_triad_gbps") is None:
        return ""
    try:
        g, m = float(rec["bf16_gemm_gflops"]), float(rec["mem_triad_gbps"])
    except (TypeError, ValueError):
        return ""
    return f"{g:,.0f} GFLOP/s bf16 GEMM, {m:.1f} GB/s memory ({rec.get('processes', '?')} x 1 thread)"


def summary_lines(machine_rec: Any) -> list[str]:
    """Markdown lines stating the machine's speed before and after the run ([] when not probed)."""
    if not isinstance(machine_rec, dict):
        return []
    said = []
    for when in ("before", "after"):
        rec = machine_rec.get(when)
        text = describe(rec) or (f"probe failed: {rec.get('error')}" if isinstance(rec, dict) and rec.get("error")
                                 else "")
        if text:
            load = rec.get("loadavg") if isinstance(rec, dict) else None
            said.append(f"{when} the run {text}" + (f", load {load[0]}" if isinstance(load, list) and load else ""))
    return ["", "Machine speed (`python -m metasae.machine`): " + "; ".join(said) + "."] if said else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metasae.machine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="one-thread probe processes side by side (default 2)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker()
        return 0
    if args.processes < 1:
        print("--processes must be at least 1", file=sys.stderr)
        return 2
    rec = probe(args.processes)
    print(json.dumps(rec, indent=2))
    return 1 if "error" in rec else 0


if __name__ == "__main__":
    sys.exit(main())
