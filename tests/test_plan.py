"""metasae.plan and ``--plan``: sizes by hand, refusals in one sentence, a measured calibration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from shipped import shipped_profiles

from metasae import harness, plan
from metasae.config import load_profile, profile_from_dict

ROOT = Path(__file__).resolve().parent.parent


def _tiny(**data) -> "plan.Profile":
    return profile_from_dict({
        "name": "tinyplan", "seeds": [0, 1],
        "model": {"name": "smollm2-135m", "layer": 4},
        "data": {"corpus": "none", "ctx_len": 16, "train_tokens": 4096, "calib_tokens": 512, "phi_tokens": 1024,
                 "autointerp_tokens": 256, **data},
        "sae": {"n_latents": 64, "k": 4},
        "meta": {"n_latents": 8, "k": 2},
        "train": {"batch_size": 256, "epochs": 2.0, "snapshot_fractions": [0.5]},
        "grid": {"lambda2": [0.3], "sigma2": [1.0], "independent_solos": 1, "meta_sizes": [], "ortho_coefs": []},
        "synthetic": {"enabled": False},
        "autointerp": {"window": 16},
    })


def test_sizes_by_hand() -> None:
    p = _tiny()
    d, n = p.sae.d_in, 64
    tokens = 4096 + 512 + 1024 + 256
    assert plan.cache_bytes(p) == (tokens, tokens * (d * 2 + 5))
    w = (2 * n * d + n + d) * 4
    assert plan.sae_bytes(n, d) == w
    final, extra = 0, []
    for seed in p.seeds:
        runs = p.runs_for_seed(seed)
        more = 0
        for r in runs:
            ww = w + (plan.sae_bytes(8, d) if r.kind == "joint" else 0)
            # final weights (no optimiser state) + export, snapshots of solo and the replicated joint
            final += ww * 2 + (w * 1 if r.name in ("solo", p.replicated_run) else 0)
            more += ww * 4  # while training: weights and two Adam moments, two copies while committing
        extra.append(more)
    cross = 2 * n * n * 4  # notebook 04, first seed: solo x selected joint, solo x solo_indep1 (int32)
    assert plan.run_folder_bytes(p) == final + max(extra) + cross
    expected = final + sum(sorted(extra)[-2:]) + cross  # two seeds train side by side
    assert plan.run_folder_bytes(p, parallel=2) == expected
    est = plan.estimate(p, jobs=2)
    assert [s.name.split()[0] for s in est.stages] == ["harvest", "train", "evaluation", "autointerp"]
    assert est.disk_bytes == tokens * (d * 2 + 5) + expected
    train = est.stages[1]
    assert train.tokens == (4096 * 2 // 256) * 256 * sum(len(p.runs_for_seed(s)) for s in p.seeds)
    assert train.ram_bytes == p.train_memory_bytes() * 2  # two seeds side by side
    assert all(s.seconds is None for s in est.stages)
    text = plan.render(est)
    assert "not estimated" in text and "| total |" in text
    # the harvest runs the blocks before the hooked layer, not the embedding
    total, run = plan.model_params(p)
    assert total == plan.MODEL_PARAMS["smollm2-135m"] and 0 < run < total
    assert run == int((total - 49152 * 576) / 30 * 4)


def test_parallel_time() -> None:
    assert plan._parallel_time([5.0, 1.0, 1.0, 1.0], 2) == 5.0
    assert plan._parallel_time([3.0, 3.0, 2.0], 2) == 5.0
    assert plan._parallel_time([1.0, 2.0], 1) == 3.0


def test_refusals_are_one_sentence() -> None:
    est = plan.estimate(_tiny(), jobs=1)
    with pytest.raises(plan.PlanError, match="MiB of disk") as exc:
        plan.check(est, free_disk=est.disk_bytes - 1, free_ram=None)
    big = max(est.stages, key=lambda s: s.disk_bytes)
    assert "\n" not in str(exc.value) and f"({big.name}: " in str(exc.value)
    plan.check(est, free_disk=est.disk_bytes, free_ram=None)
    biggest = max(s.ram_bytes for s in est.stages)
    with pytest.raises(plan.PlanError, match="of memory for"):
        plan.check(est, free_disk=None, free_ram=biggest - 1)
    with pytest.raises(plan.PlanError, match="GPU memory"):
        plan.check(plan.estimate(_tiny(), device="cuda"), None, None, gpu_bytes=1)


def test_harness_refuses_what_the_disk_will_not_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _tiny()
    need = plan.estimate(p, 1).disk_bytes
    monkeypatch.setattr(harness, "_free_disk", lambda folder: need // 2)
    with pytest.raises(harness.HarnessError, match="MiB of disk") as exc:
        harness.check_plan(p, 1, tmp_path / "out")
    assert "--plan" in str(exc.value)
    # a rerun into a folder that already holds most of the run needs only what is missing
    out = tmp_path / "out"
    out.mkdir()
    (out / "blob").write_bytes(b"\0" * (need // 2 + 1))
    harness.check_plan(p, 1, out)


@pytest.mark.parametrize("name", shipped_profiles())
def test_every_shipped_profile_has_a_plan(name: str) -> None:
    prof = load_profile(name)
    est = plan.estimate(prof, jobs=2, device="cuda" if prof.train.device != "cpu" else "cpu")
    assert est.disk_bytes > 0 and all(s.tokens > 0 for s in est.stages[1:])
    # the harvest stage harvests the cached splits (none when all are streamed: token ids only)
    assert est.stages[0].tokens == sum(getattr(prof.data, f"{x}_tokens") for x in ("train", "calib", "phi", "autointerp")
                                       if x not in prof.data.stream_splits)


def test_calibration_measures_this_machine() -> None:
    p = load_profile("smoke")
    calib = plan.calibrate(p, "cpu", steps=1, threads=1)
    assert calib.harvest_flops > 0 and all(v > 0 for v in calib.gemm_flops.values())
    assert set(calib.step_s) >= {"solo", "joint"} and all(v > 0 for v in calib.step_s.values())
    est = plan.estimate(p, jobs=2, calib=calib)
    assert all(s.seconds and s.seconds > 0 for s in est.stages[:3]) and est.stages[3].seconds is None
    assert "Calibration on cpu" in plan.render(est, calib)


def test_plan_cli() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "metasae.harness", "--profile", "smoke", "--plan"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Plan for profile `smoke`" in proc.stdout and "| train (01_train) |" in proc.stdout


def test_a_streamed_training_split_needs_no_disk_for_its_activations() -> None:
    import dataclasses

    p = _tiny()
    s = dataclasses.replace(p, data=dataclasses.replace(p.data, stream_splits=["train"]))
    d = p.sae.d_in
    tokens, size = plan.cache_bytes(s)
    assert tokens == 512 + 1024 + 256
    assert size == tokens * d * 2 + 5 * (4096 + 512 + 1024 + 256)
    assert plan.cache_bytes(p)[1] - size == 4096 * d * 2
    est = plan.estimate(s, jobs=1)
    assert "streamed" in est.stages[1].note and est.stages[1].ram_bytes > plan.estimate(p, jobs=1).stages[1].ram_bytes


def test_streamed_calib_and_phi_splits_leave_the_disk_and_cost_harvests() -> None:
    import dataclasses

    p = _tiny()
    s = dataclasses.replace(p, data=dataclasses.replace(p.data, stream_splits=["train", "calib", "phi"]))
    d = p.sae.d_in
    assert plan.cache_bytes(s) == (256, 256 * d * 2 + 5 * (4096 + 512 + 1024 + 256))
    calib = plan.Calibration("cpu", {"float32": 1e9, "bfloat16": 1e9}, 1e9, {"solo": 0.01, "joint": 0.01}, 0.01)
    cached, streamed = plan.estimate(p, 1, calib), plan.estimate(s, 1, calib)
    _, run = plan.model_params(p)
    passes_phi, passes_calib = 2, 2  # one each for the runs and for the snapshots (all fit in one pass)
    harvest = (passes_phi * 1024 + passes_calib * 512) * 2.0 * run / (1e9 * plan.HARVEST_EFFICIENCY)
    assert streamed.stages[2].seconds == pytest.approx(cached.stages[2].seconds + harvest * len(p.seeds))
    assert "harvested in each pass" in streamed.stages[2].note and "2 passes per seed" in streamed.stages[2].note
    # with little memory the SAEs' counts take a pass each (4 runs + 2 snapshots per seed)
    small = plan.estimate(s, 1, calib, host_bytes=2 * 2 * 64 * 64)
    assert "1 SAE per pass (6 passes per seed" in small.stages[2].note


def test_gpt2_large_streams_every_split_and_needs_under_50_gb() -> None:
    p = load_profile("gpt2-large")
    assert set(p.data.stream_splits) == {"train", "calib", "phi", "autointerp"}
    est = plan.estimate(p, device="cuda", host_bytes=120 * plan.GiB, gpu_bytes=80 * plan.GiB)
    assert est.disk_bytes < 50e9
    assert "12 SAEs per pass (2 passes per seed)" in est.stages[2].note
    # the autointerp split lives in memory instead: its 5M tokens x 1280 x 2 bytes
    assert est.stages[3].ram_bytes >= 5_000_000 * 1280 * 2 and "into memory" in est.stages[3].note
