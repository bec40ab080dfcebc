"""metasae.summary on a fake output tree: every number checked by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metasae import summary

ROOT = Path(__file__).resolve().parent.parent
JOINT = "l0.3_s1.0"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def _linear_history(total: int = 100, every: int = 5) -> list[dict]:
    # mse = 1 - 0.004 step: the 65-75 % window holds steps 70, 75 (0.72, 0.70), the last 10 % 95, 100 (0.62, 0.60)
    return [{"step": s, "mse": 1 - 0.004 * s, "loss": 0.0} for s in range(every, total + 1, every)]


LINEAR_IMPROVEMENT = (0.71 - 0.61) / 0.71


@pytest.fixture
def run(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    _write(out / "results.json", {
        "profile": "default", "seeds": [0, 1, 2, 3], "commit": "abc123", "dirty": False,
        "finished": "2026-01-01T00:00:00+00:00", "wall_s_total": 2700.5, "wall_s_total_includes_setup": True,
        "machine": {"before": {"processes": 2, "bf16_gemm_gflops": 1300.0, "mem_triad_gbps": 26.0}},
        "setup_s": 120.25,
        "stages": {"01_train": {"wall_s": 900.0, "per_execution": [{"seed": 0, "seconds": 450.0}], "concurrency": 2}},
    })
    _write(out / "config.json", {"name": "default", "seeds": [0, 1, 2, 3]})
    _write(out / "selection.json", {"selected": "l0.1_s1.0", "replicated": JOINT})
    ev = {
        0: {"solo": {"dead_frac": 0.05, "explained_variance_std": 0.85, "ce_loss_score": 0.93,
                     "mean_abs_phi": 0.020, "mse": 0.30, "mse_batchtopk": 0.9, "delta_ce_pct": 2.0},
            JOINT: {"mean_abs_phi": 0.019, "mse": 0.303, "mse_batchtopk": 0.1, "delta_ce_pct": 2.5,
                    "meta_explained_variance": 0.9},
            "l0.1_s1.0": {"mean_abs_phi": 0.5}},
        1: {"solo": {"dead_frac": 0.2, "explained_variance_std": 0.7, "ce_loss_score": 0.95,
                     "mean_abs_phi": 0.025, "mse": 0.20, "delta_ce_pct": 1.0},
            JOINT: {"mean_abs_phi": 0.024, "mse": 0.204, "delta_ce_pct": 1.2}},
        # Delta L2 from mse (the one reconstruction rule); the joint has no CE; the solo no ce_loss_score
        2: {"solo": {"dead_frac": 0.0, "explained_variance_std": 0.81, "mean_abs_phi": 0.010, "mse": 0.5,
                     "delta_ce_pct": 3.0},
            JOINT: {"mean_abs_phi": 0.0097, "mse": 0.515}},
        # the joint run is absent: skipped in the headline
        3: {"solo": {"dead_frac": "n/a", "explained_variance_std": 0.9, "ce_loss_score": float("nan"),
                     "mean_abs_phi": 0.5}},
    }
    for s, e in ev.items():
        _write(out / f"seed{s}" / "metrics" / "eval.json", e)
    ck = lambda s: out / f"seed{s}" / "checkpoints"  # noqa: E731
    _write(ck(0) / "solo" / "history.json", _linear_history())
    # seed 1: the committed step folder wins over a later, uncommitted one
    _write(ck(1) / "trainer.json", {"step": 100, "complete": True, "fingerprint": "x", "runs": ["solo"]})
    _write(ck(1) / "solo" / "step00000100" / "history.json", _linear_history())
    _write(ck(1) / "solo" / "step00000200" / "history.json", [{"step": 1, "mse": 1.0}, {"step": 2, "mse": 0.0}])
    # seed 3: sparse logging, no trainer.json: the latest step folder; the windows fall back to the nearest rows
    _write(ck(3) / "solo" / "step00000050" / "history.json", [])
    _write(ck(3) / "solo" / "step00000100" / "history.json",
           [{"step": 10, "mse": 1.0}, {"step": 60, "mse": 0.8}, {"step": 100, "mse": 0.5}, {"step": None, "mse": 9}])
    tables = out / "tables"
    _write(tables / "table1_grid.csv", "run,x\nsolo,1\n")
    _write(tables / "table1_grid.md", "| run | x |\n")
    _write(tables / "notes.txt", "not a table")
    return out


def test_summary_numbers(run: Path, tmp_path: Path) -> None:
    dest = tmp_path / "results" / "default"
    _write(dest / "tables" / "stale_table.csv", "old")
    path = summary.write_summary(run, dest)
    assert path == dest / "summary.json"
    s = json.loads(path.read_text())

    assert (s["git_commit"], s["git_dirty"], s["profile"], s["seeds"]) == ("abc123", False, "default", [0, 1, 2, 3])
    assert s["wall_s_total"] == 2700.5 and s["wall_s_total_includes_setup"] is True and s["setup_s"] == 120.25
    assert s["machine"] == {"before": {"processes": 2, "bf16_gemm_gflops": 1300.0, "mem_triad_gbps": 26.0}}
    assert s["stages"]["01_train"]["wall_s"] == 900.0

    q = s["solo_quality"]
    assert q["0"] == {"dead_frac": 0.05, "explained_variance_std": 0.85, "ce_loss_score": 0.93, "l0_threshold": None,
                      "mse_last_quarter_rel_improvement": pytest.approx(LINEAR_IMPROVEMENT)}
    assert q["1"]["mse_last_quarter_rel_improvement"] == pytest.approx(LINEAR_IMPROVEMENT)
    assert q["1"]["dead_frac"] == 0.2
    assert q["2"]["ce_loss_score"] is None and q["2"]["mse_last_quarter_rel_improvement"] is None
    assert q["3"] == {"dead_frac": None, "explained_variance_std": 0.9, "ce_loss_score": None, "l0_threshold": None,
                      "mse_last_quarter_rel_improvement": pytest.approx((0.8 - 0.5) / 0.8)}

    assert s["meta_explained_variance"] == {"0": 0.9, "1": None, "2": None, "3": None}
    c = s["comparisons"]
    assert c["selection"]["replicated"] == JOINT and c["delta_phi_pct_solo_indep1"]["n"] == 0
    assert c["delta_phi_pct_along_training"] == {}

    h = s["headline"]
    assert h["joint"] == JOINT and h["n_seeds"] == 3 and h["seeds"] == [0, 1, 2]
    # Delta |phi| % per seed: -5, -4, -3 -> mean -4, sd 1, se 1/sqrt(3)
    assert [h["per_seed"][k]["delta_phi_pct"] for k in "012"] == pytest.approx([-5.0, -4.0, -3.0])
    assert h["delta_phi_pct_mean"] == pytest.approx(-4.0)
    assert h["delta_phi_pct_se"] == pytest.approx(1 / math.sqrt(3))
    # MDE: (t_{0.975,2} + t_{0.8,2}) * 1 / sqrt(3) = (4.302653 + 1.060660) / sqrt(3)
    assert h["mde_pct"] == pytest.approx((4.302653 + 1.060660) / math.sqrt(3), rel=1e-6)
    # paired t test of phi: differences -0.001, -0.001, -0.0003
    d = [-0.001, -0.001, -0.0003]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    # two-sided p with 2 degrees of freedom, closed form: 1 - |t| / sqrt(t^2 + 2)
    assert h["p_paired"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-9)
    # Delta L2 % from mse (the global-threshold rule), never mse_batchtopk: +1, +2, +3
    assert [h["per_seed"][k]["delta_l2_pct"] for k in "012"] == pytest.approx([1.0, 2.0, 3.0])
    assert h["delta_l2_pct_mean"] == pytest.approx(2.0)
    # Delta CE (percentage points): 0.5, 0.2, missing
    assert h["per_seed"]["0"]["delta_ce_pct"] == pytest.approx(0.5)
    assert h["per_seed"]["2"]["delta_ce_pct"] is None
    assert h["delta_ce_pct_mean"] == pytest.approx(0.35)
    assert h["delta_ce_pct_se"] == pytest.approx(0.15)

    tables = sorted(p.name for p in (dest / "tables").iterdir())
    assert tables == ["table1_grid.csv", "table1_grid.md"]
    assert (dest / "tables" / "table1_grid.csv").read_text() == "run,x\nsolo,1\n"


def test_selected_fallback_and_missing_pieces(run: Path, tmp_path: Path) -> None:
    _write(run / "selection.json", {"selected": "l0.1_s1.0"})
    h = summary.build_summary(run)["headline"]
    assert h["joint"] == "l0.1_s1.0" and h["n_seeds"] == 1 and h["seeds"] == [0]
    assert h["delta_phi_pct_mean"] == pytest.approx(100 * (0.5 / 0.02 - 1))
    assert h["delta_phi_pct_se"] is None and h["p_paired"] is None and h["mde_pct"] is None
    assert h["delta_l2_pct_mean"] is None and h["delta_ce_pct_mean"] is None

    (run / "selection.json").unlink()
    res = json.loads((run / "results.json").read_text())
    for key in ("seeds", "stages", "wall_s_total", "commit", "machine"):
        del res[key]
    _write(run / "results.json", res)
    s = summary.build_summary(run)
    assert s["seeds"] == [0, 1, 2, 3]  # from config.json
    assert s["headline"]["joint"] is None and s["headline"]["n_seeds"] == 0
    assert s["headline"]["delta_phi_pct_mean"] is None
    assert s["meta_explained_variance"] == {"0": None, "1": None, "2": None, "3": None}
    assert s["stages"] == {} and s["wall_s_total"] is None and s["git_commit"] is None and s["machine"] == {}
    json.dumps(s, allow_nan=False)  # no NaN anywhere


def test_mse_last_quarter_definition() -> None:
    f = summary.mse_last_quarter_rel_improvement
    assert f(_linear_history()) == pytest.approx(LINEAR_IMPROVEMENT)
    flat = [{"step": s, "mse": 0.3} for s in range(1, 201)]
    assert f(flat) == 0.0
    rising = [{"step": s, "mse": 0.001 * s} for s in range(1, 101)]
    # 65-75 % window: steps 66..75 -> mean 0.0705; last 10 %: 91..100 -> 0.0955
    assert f(rising) == pytest.approx((0.0705 - 0.0955) / 0.0705)
    assert f([]) is None and f([{"step": 1, "mse": 1.0}]) is None and f(None) is None
    assert f([{"step": 1, "mse": 0.0}, {"step": 2, "mse": 0.0}]) is None


def test_refuses_without_results(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "metasae.summary", "--out", str(tmp_path / "out"),
                           "--dest", str(tmp_path / "dest")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "results.json" in lines[0]
    assert not (tmp_path / "dest").exists()


def test_cli_writes_summary(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main(["--out", str(run), "--dest", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "summary.json").is_file()
    assert "summary.json" in capsys.readouterr().out


def test_comparisons_along_training_and_seed_noise(tmp_path):
    out = tmp_path / "out"
    for seed, (indep, along) in enumerate([(0.021, 0.0195), (0.026, 0.0245)]):
        _write(out / f"seed{seed}" / "metrics" / "eval.json", {
            "solo": {"mean_abs_phi": 0.020 + 0.005 * seed, "ce_loss_score_all_tokens": 0.8},
            "solo_indep1": {"mean_abs_phi": indep}, "joint_l0": {"mean_abs_phi": 0.020 + 0.005 * seed},
            JOINT: {"mean_abs_phi": 0.019}})
        _write(out / f"seed{seed}" / "metrics" / "snapshots.json", {"rows": [
            {"run": "solo", "frac": 0.5, "mean_abs_phi": 0.020}, {"run": JOINT, "frac": 0.5, "mean_abs_phi": along}]})
    _write(out / "selection.json", {"replicated": JOINT, "selected_by_rule": "x", "chosen_on_seed": 0})
    from metasae.summary import comparisons

    c = comparisons(out, [0, 1])
    assert c["delta_phi_pct_solo_indep1"]["mean"] == pytest.approx((5.0 + 4.0) / 2)
    assert c["delta_phi_pct_joint_l0"] == {"mean": 0.0, "se": 0.0, "n": 2, "p": None}  # no spread: no test
    assert c["solo_ce_loss_score_all_tokens"]["mean"] == pytest.approx(0.8)
    assert c["delta_phi_pct_along_training"]["0.5"]["mean"] == pytest.approx((-2.5 + 22.5) / 2)
    assert c["selection"]["selected_by_rule"] == "x"


def test_one_sample_p_ci_grid_and_synthetic_verdict(tmp_path):
    from scipy import stats

    xs = [-3.0, -4.0, -5.0, -2.0]
    assert summary.one_sample_p(xs) == pytest.approx(stats.ttest_1samp(xs, 0.0).pvalue)
    assert summary.one_sample_p([1.0]) is None and summary.one_sample_p([2.0, 2.0]) is None
    lo, hi = summary.ci95(xs)
    half = stats.t.ppf(0.975, 3) * stats.tstd(xs) / 2.0  # se = sd / sqrt(4)
    assert (lo, hi) == (pytest.approx(-3.5 - half), pytest.approx(-3.5 + half))
    assert summary.ci95([1.0]) == (None, None)

    out = tmp_path / "out"
    _write(out / "seed7" / "metrics" / "eval.json", {
        "solo": {"mean_abs_phi": 0.02, "mse": 0.2, "delta_ce_pct": 1.0},
        "ortho_c0.3": {"mean_abs_phi": 0.019, "mse": 0.21},
        "joint_l1_s1": {"mean_abs_phi": 0.021, "mse": 0.25, "delta_ce_pct": 1.5}})
    g = summary.grid_first_seed(out, [7, 8])
    assert g["seed"] == 7 and set(g["runs"]) == {"ortho_c0.3", "joint_l1_s1"}
    assert g["runs"]["ortho_c0.3"] == {"delta_phi_pct": pytest.approx(-5.0), "delta_l2_pct": pytest.approx(5.0),
                                       "delta_ce_pct": None}
    assert g["runs"]["joint_l1_s1"]["delta_ce_pct"] == pytest.approx(0.5)
    assert summary.grid_first_seed(out, []) == {}

    assert summary.synthetic_verdict(out) is None  # no table
    _write(out / "tables" / "synthetic_verdict.csv", 'verdict\n"Less atomic, by the ground truth."\n')
    assert summary.synthetic_verdict(out) == "Less atomic, by the ground truth."


def test_seeds_for_mde() -> None:
    # the reference run's seed-to-seed SD of Delta |phi| % (2.91): 9 seeds give 3.10, 10 give 2.89
    assert summary.seeds_for_mde(2.91) == 10
    vals = [0.29, -0.21, -0.44, 6.09, -1.0]
    sd = summary._sd(vals)
    n = summary.seeds_for_mde(sd)
    assert summary.mde(vals) == pytest.approx(4.84, abs=0.01)  # 5 seeds
    assert n == 10 and summary.mde(_with_sd(sd, n)) <= 3.0  # the same SD over n seeds: within the target
    assert summary.mde(_with_sd(sd, n - 1)) > 3.0
    assert summary.seeds_for_mde(0.0) == 2
    assert summary.seeds_for_mde(None) is None and summary.seeds_for_mde(float("nan")) is None
    assert summary.seeds_for_mde(1e6) is None  # beyond MAX_SEEDS


def _with_sd(sd: float, n: int) -> list[float]:
    """n values with sample SD exactly sd (mean 0)."""
    base = [(-1) ** i for i in range(n)] if n % 2 == 0 else [(-1) ** i for i in range(n - 1)] + [0.0]
    m = sum(base) / n
    base = [b - m for b in base]
    s = math.sqrt(sum(b * b for b in base) / (n - 1))
    return [b * sd / s for b in base]

