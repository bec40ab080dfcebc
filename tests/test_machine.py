"""The machine-speed probe recorded beside a run's wall time (metasae.machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metasae import machine

ROOT = Path(__file__).resolve().parent.parent


def test_probe_measures_side_by_side_processes() -> None:
    rec = machine.probe(2)
    assert "error" not in rec, rec
    assert rec["processes"] == 2 and rec["threads_each"] == 1 and len(rec["per_process"]) == 2
    assert rec["bf16_gemm_gflops"] == pytest.approx(sum(p["bf16_gemm_gflops"] for p in rec["per_process"]), abs=0.1)
    assert rec["mem_triad_gbps"] == pytest.approx(sum(p["mem_triad_gbps"] for p in rec["per_process"]), abs=0.02)
    for p in rec["per_process"]:
        # a bf16 GEMM of this shape does ~215 GFLOP: even an old core does >= 1 GFLOP/s; a triad
        # over 384 MiB moves >= 0.1 GB/s on anything that runs the test suite
        assert p["bf16_gemm_gflops"] > 1 and p["mem_triad_gbps"] > 0.1
    assert len(rec["loadavg"]) == 3 and rec["seconds"] > 0


def test_a_failed_probe_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine.sys, "executable", str(ROOT / "no-such-python"))
    rec = machine.probe(2)
    assert "bf16_gemm_gflops" not in rec and "no-such-python" in rec["error"]
    assert machine.describe(rec) == ""
    assert machine.summary_lines({"before": rec}) == [
        "", f"Machine speed (`python -m metasae.machine`): before the run probe failed: {rec['error']}, "
            f"load {rec['loadavg'][0]}."]


def test_describe_and_summary_lines() -> None:
    before = {"processes": 2, "bf16_gemm_gflops": 1319.4, "mem_triad_gbps": 26.84, "loadavg": [0.5, 1.0, 1.2]}
    after = {"processes": 2, "bf16_gemm_gflops": 1125.0, "mem_triad_gbps": 21.0, "loadavg": [2.1, 2.2, 2.0]}
    assert machine.describe(before) == "1,319 GFLOP/s bf16 GEMM, 26.8 GB/s memory (2 x 1 thread)"
    assert machine.summary_lines({"before": before, "after": after}) == [
        "", "Machine speed (`python -m metasae.machine`): before the run 1,319 GFLOP/s bf16 GEMM, 26.8 GB/s memory "
            "(2 x 1 thread), load 0.5; after the run 1,125 GFLOP/s bf16 GEMM, 21.0 GB/s memory (2 x 1 thread), "
            "load 2.1."]
    for nothing in (None, {}, {"before": {"bf16_gemm_gflops": "fast"}}, "text"):
        assert machine.summary_lines(nothing) == []


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False), ("off", False), ("False", False)])
def test_enabled(value: str | None, on: bool) -> None:
    assert machine.enabled({} if value is None else {machine.PROBE_ENV: value}) is on


def test_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "metasae.machine", "--processes", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["processes"] == 1
    bad = subprocess.run([sys.executable, "-m", "metasae.machine", "--processes", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "--processes must be at least 1"
