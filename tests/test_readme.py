"""metasae.readme: the README's generated default-run block, on a temporary README."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from metasae import readme

ROOT = Path(__file__).resolve().parent.parent

SUMMARY = {
    "profile": "default", "seeds": [0, 1, 2], "git_commit": "0123456789abcdef0123", "git_dirty": False,
    "wall_s_total": 2712.0, "wall_s_total_includes_setup": True, "setup_s": 132.0,
    "machine": {"before": {"processes": 3, "bf16_gemm_gflops": 1319.4, "mem_triad_gbps": 26.84, "loadavg": [0.5, 1, 1]},
                "after": {"processes": 3, "bf16_gemm_gflops": 1125.0, "mem_triad_gbps": 21.0, "loadavg": [2.1, 2, 2]}},
    "stages": {
        "01_train": {"wall_s": 1230.0, "concurrency": 3,
                     "per_execution": [{"seed": 0, "seconds": 1200.0}, {"seed": 1, "seconds": 1210.0},
                                       {"seed": 2, "seconds": 1190.0}]},
        "06_seeds": {"wall_s": 9.0, "concurrency": 1, "per_execution": [{"seed": None, "seconds": 9.0}]},
    },
    "solo_quality": {
        "0": {"dead_frac": 0.05, "explained_variance_std": 0.85, "ce_loss_score": 0.93,
              "mse_last_quarter_rel_improvement": 0.03},
        "1": {"dead_frac": 0.125, "explained_variance_std": 0.79, "ce_loss_score": 0.9,
              "mse_last_quarter_rel_improvement": 0.08},
        "2": {"dead_frac": None, "explained_variance_std": 0.8, "ce_loss_score": None,
              "mse_last_quarter_rel_improvement": 0.05},
    },
    "meta_explained_variance": {"0": 0.912, "1": None, "2": 0.9},
    "headline": {"joint": "l0.3_s1.0", "n_seeds": 3, "delta_phi_pct_mean": -4.04, "delta_phi_pct_se": 2.61,
                 "p_paired": 0.2551, "mde_pct": 16.43, "delta_l2_pct_mean": 1.654, "delta_ce_pct_mean": 0.3456,
                 "delta_phi_pct_sd": 4.52, "mde_target_pct": 3.0, "seeds_for_mde_target": 21},
}

README = """\
# project

Intro text.

## Options

Some options.

## What the default profile shows (3 seeds, mean +/- SE)

* prose that must stay
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    s = tmp_path / "results" / "default" / "summary.json"
    s.parent.mkdir(parents=True)
    s.write_text(json.dumps(SUMMARY))
    r = tmp_path / "README.md"
    r.write_text(README)
    r.chmod(0o644)
    return s, r


def _run(s: Path, r: Path, *extra: str) -> int:
    return readme.main(["--summary", str(s), "--readme", str(r), *extra])


def _block(text: str) -> str:
    return text[text.index(readme.BEGIN):text.index(readme.END) + len(readme.END)]


def test_block_contents(files: tuple[Path, Path]) -> None:
    s, r = files
    assert _run(s, r) == 0
    block = _block(r.read_text())
    assert "[`results/default/summary.json`](results/default/summary.json)" in block
    assert "commit `0123456789ab`" in block and "seeds 0, 1, 2" in block
    # wall time in minutes
    assert "| total, `bash run_all.sh` from its start (environment setup included) | 45.2 |" in block
    assert "| setup before the notebooks (environment, corpus) | 2.2 |" in block
    assert "| 01_train (3 runs, 3 side by side) | 20.5 |" in block
    assert "| 06_seeds | 0.1 |" in block
    assert ("Machine speed (`python -m metasae.machine`): before the run 1,319 GFLOP/s bf16 GEMM, 26.8 GB/s memory "
            "(3 x 1 thread), load 0.5; after the run 1,125 GFLOP/s") in block
    # quality bars: met / not met, the bar value itself counts as met
    assert "| 0 | 5.0% met | 0.850 met | 0.930 met | 3.0% met |" in block
    assert "| 1 | 12.5% not met | 0.790 not met | 0.900 met | 8.0% not met |" in block
    assert "| 2 | n/a (not measured) | 0.800 met | n/a (not measured) | 5.0% met |" in block
    assert "Meta SAE explained variance (joint `l0.3_s1.0`): seed 0: 0.912, seed 1: n/a, seed 2: 0.900." in block
    assert "over n = 3 seeds" in block
    assert "Delta mean |phi| = -4.0 +/- 2.6 % (mean +/- SE)" in block
    assert "p = 0.255" in block and "power 0.8) 16.4 %" in block
    # seeds 1 and 2 took 1210 and 1190 s: 20 min each; 18 more seeds on 3 processes: 18 x 1200 / 3 s = 120 min
    assert ("power 0.8) 16.4 %. At the measured seed-to-seed SD (4.5 %), an MDE of 3 % needs 21 seeds: 18 more, "
            "at 20.0 min of process time each in this run (a seed after the first: its training and evaluation), "
            "about 120 min more wall time on its 3 processes.") in block
    assert "Delta L2 = +1.65 %" in block and "Delta CE = +0.35 percentage points" in block


def test_insert_before_anchor_then_replace_only_the_block(files: tuple[Path, Path]) -> None:
    s, r = files
    assert _run(s, r, "--check") == 1  # no block yet
    assert r.read_text() == README  # --check changes nothing
    assert _run(s, r) == 0
    text = r.read_text()
    before, _, after = text.partition(readme.BEGIN)
    assert before == README[:README.index("## What the default")]
    assert after.split(readme.END + "\n", 1)[1] == "\n" + README[README.index("## What the default"):]
    assert stat.S_IMODE(r.stat().st_mode) == 0o644
    assert _run(s, r, "--check") == 0
    assert _run(s, r) == 0 and r.read_text() == text  # idempotent

    # a new summary changes the block and nothing else
    changed = dict(SUMMARY, git_commit="fedcba9876543210")
    s.write_text(json.dumps(changed))
    assert _run(s, r, "--check") == 1
    assert _run(s, r) == 0
    new = r.read_text()
    assert "fedcba987654" in new and "0123456789ab" not in new
    assert new.replace(_block(new), "") == text.replace(_block(text), "")

    # hand edits inside the block are caught by --check and overwritten
    r.write_text(new.replace("45.2", "1.0"))
    assert _run(s, r, "--check") == 1
    assert _run(s, r) == 0 and r.read_text() == new


def test_without_anchor_the_block_goes_at_the_end(files: tuple[Path, Path]) -> None:
    s, r = files
    r.write_text("# project\n\nNo anchor here.")
    assert _run(s, r) == 0
    text = r.read_text()
    assert text.startswith("# project\n\nNo anchor here.\n\n" + readme.BEGIN)
    assert text.endswith(readme.END + "\n")
    assert _run(s, r, "--check") == 0


def test_bad_input(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s, r = files
    assert _run(tmp_path / "missing.json", r) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.json" in err[0] and "metasae.summary" in err[0]
    r.write_text(README + readme.BEGIN + "\n")  # BEGIN without END
    assert _run(s, r) == 2
    assert r.read_text() == README + readme.BEGIN + "\n"


def test_missing_numbers_render_as_na() -> None:
    block = readme.render_block({"solo_quality": {"0": {}}, "headline": {}}, "summary.json")
    assert "| 0 | n/a (not measured) | n/a (not measured) | n/a (not measured) | n/a (not measured) |" in block
    assert "over n = 0 seeds" in block and "Delta mean |phi| = n/a +/- n/a %" in block
    assert "environment setup not measured" in block
    assert "The machine's speed was not recorded by this run" in block
    assert "needs" not in block  # no seed-to-seed SD, no number of seeds
    enough = readme.render_block({"headline": {"n_seeds": 5, "delta_phi_pct_sd": 1.0, "mde_target_pct": 3.0,
                                               "seeds_for_mde_target": 4}}, "summary.json")
    assert "At the measured seed-to-seed SD (1.0 %), an MDE of 3 % needs 4 seeds." in enough
    never = readme.render_block({"headline": {"delta_phi_pct_sd": 1e9, "mde_target_pct": 3.0,
                                              "seeds_for_mde_target": None}}, "summary.json")
    assert "no number of seeds up to 1,000 reaches an MDE of 3 %." in never


def test_cli_check(files: tuple[Path, Path]) -> None:
    s, r = files
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "metasae.readme", "--summary", str(s), "--readme", str(r)]
    proc = subprocess.run([*cmd, "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "out of date" in proc.stderr
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=120).returncode == 0
    assert subprocess.run([*cmd, "--check"], cwd=ROOT, env=env, capture_output=True, timeout=120).returncode == 0


def _verdicts(**changes) -> str:
    base = {
        "headline": {"joint": "j", "n_seeds": 5, "delta_phi_pct_mean": -1.2, "p_paired": 0.2,
                     "delta_phi_pct_ci95": [-3.4, 1.0], "delta_l2_pct_mean": 11.8, "delta_ce_pct_mean": 0.61},
        "comparisons": {
            "delta_phi_pct_solo_indep1": {"mean": -1.8, "se": 1.3, "n": 5, "p": 0.25},
            "delta_phi_pct_along_training": {"0.25": {"mean": -3.8, "p": 0.002}, "0.5": {"mean": -0.4, "p": 0.6},
                                             "1": {"mean": -1.2, "p": 0.2}},
            "meta_explained_variance_joint_l0": {"mean": 0.37, "se": 0.0, "n": 5}},
        "meta_explained_variance": {"0": 0.11, "1": 0.13},
        "grid_first_seed": {"seed": 0, "runs": {
            "joint_l0": {"delta_phi_pct": 0.0, "delta_l2_pct": 0.0},
            "joint_a": {"delta_phi_pct": -2.0, "delta_l2_pct": 8.0},   # ortho better on both
            "joint_b": {"delta_phi_pct": -6.0, "delta_l2_pct": 8.0},   # lower |phi| than ortho
            "joint_c": {"delta_phi_pct": -1.0, "delta_l2_pct": 1.0},   # lower L2 than ortho
            "ortho_c1": {"delta_phi_pct": -5.0, "delta_l2_pct": 4.4},
            "ortho_c2": {"delta_phi_pct": -0.5, "delta_l2_pct": 0.5}}},
        "synthetic_verdict": "Less atomic by the ground truth.",
    }
    for k, v in changes.items():
        base[k] = {**base[k], **v}
    return "\n".join(readme.render_verdicts(base))


def test_verdicts_follow_the_numbers() -> None:
    text = _verdicts()
    assert "no significant change, -1.2 % (95% CI [-3.4, +1.0] %; the paper's -7.5 % on one run lies outside it)" \
        in text
    assert "Delta L2 +11.8 % (paper +9.3 %), Delta CE +0.61 percentage points" in text
    assert ("independent solo (no penalty, another init seed) differs from the solo by -1.8 +/- 1.3 % (not "
            "significant), with a standard deviation over seeds of 2.9 %") in text
    assert ("snapshot: 25 %: -3.8 % (a significant reduction, p = 0.002); 50 %: -0.4 % (not significant, p = 0.6); "
            "100 %: -1.2 % (not significant, p = 0.2).") in text
    assert "`ortho_c1` reaches -5.0 % |phi| at +4.4 % L2; it is as good or better on both counts than 1 of the 3" \
        in text
    assert "explains 0.12 of the variance of the joint's decoder rows and 0.37" in text
    assert "moves the primary's rows away" in text and "benchmarks/meta_probe.py" in text
    assert "Less atomic by the ground truth." in text
    # a significant reduction whose interval holds the paper's number; a smaller seed noise
    text = _verdicts(headline={"delta_phi_pct_mean": -7.0, "p_paired": 0.01, "delta_phi_pct_ci95": [-9.0, -5.0]})
    assert "a significant reduction, -7.0 % (95% CI [-9.0, -5.0] %; the paper's -7.5 % on one run lies inside it)" \
        in text
    text = _verdicts(headline={"delta_phi_pct_mean": 3.0, "p_paired": 0.01, "delta_phi_pct_ci95": [1.0, 5.0]})
    assert "a significant increase, +3.0 %" in text
    # an increase along training is called one; a snapshot without a test says so
    text = _verdicts(comparisons={"delta_phi_pct_along_training": {"0.5": {"mean": 2.9, "p": 0.028},
                                                                   "1": {"mean": -2.0, "p": None}}})
    assert "50 %: +2.9 % (a significant increase, p = 0.028); 100 %: -2.0 % (not tested)." in text
    # a missing headline leaves the claim out rather than inventing a verdict
    text = _verdicts(headline={"delta_phi_pct_mean": None})
    assert "Lower co-occurrence" not in text


AUTOINTERP = {
    "judge": "qwen2.5-coder-1.5b", "backend": "hf-local", "seed": 0, "n_pairs_scored": 10,
    "validation_latents": ["digits", "comma", "lord"],
    "validation_auc": {"fuzz": 0.91, "detection": 0.62, "embedding": 0.85},
    "validation_auc_ci": {"fuzz": [0.8, 1.0], "detection": [0.4, 0.8], "embedding": [0.7, 0.95]},
    "validation_auc_vs_wrong": {"fuzz": 0.7, "detection": 0.5, "embedding": 0.6},
    "validation_speed": {"seconds": 300.0, "n_requests": 900, "requests_per_s": 3.0},
    "n_pairs_embedding_only": 30, "pairs_speed": {"seconds": 500.4, "n_requests": 1900},
    "vs_random": {"fuzz": {"diff": 0.12, "ci_low": 0.05, "ci_high": 0.19, "n": 10},
                  "detection": {"diff": 0.02, "ci_low": -0.03, "ci_high": 0.07, "n": 10}},
    "joint_vs_solo": {"fuzz": {"delta": -0.02, "p": 0.6, "n_pairs": 10, "mde": 0.11}},
}


def test_autointerp_block_and_verdicts() -> None:
    block = readme.render_block({**SUMMARY, "autointerp": AUTOINTERP}, "results/default/summary.json")
    assert "judge `qwen2.5-coder-1.5b` via hf-local; on the validation set it answered 900 requests in 300 s " \
           "(3.00 per second)" in block
    assert "| fuzz | 0.91 [0.80, 1.00] | 0.70 | +0.120 [+0.050, +0.190] (n = 10) |" in block
    assert "| embedding | 0.85 [0.70, 0.95] | 0.60 | n/a [n/a, n/a] (n = 0) |" in block
    assert ("tells the correct explanation from a random one with AUC >= 0.8 on fuzz (0.91), embedding (0.85); "
            "detection 0.62 fall short.") in block
    assert "beats a random one (95% CI of the difference above 0) on 1 of 2 scores: fuzz +0.120 [+0.050, +0.190]." \
        in block
    assert "fuzz -0.020 (p = 0.6, MDE 0.110); no score differs significantly." in block
    # where the autointerp notebook's time went, from the stage timings and the recorded speeds
    assert "the 10 pairs with every scorer and 30 with the embedding scorer alone 500 s (1900 requests" in block
    stages = {"03_autointerp": {"per_execution": [{"seed": 1, "seconds": 3.0}, {"seed": 0, "seconds": 840.0}]}}
    block = readme.render_block({**SUMMARY, "stages": stages, "autointerp": AUTOINTERP}, "results/default/summary.json")
    assert ("Seed 0's autointerp notebook took 840 s (14.0 min): the judge validation set 300 s (once per run); "
            "the 10 pairs") in block
    # the validation set as a task of its own (--jobs 2): its seconds join the notebook's
    stages["03_autointerp"]["per_execution"].insert(0, {"seed": None, "part": "judge validation", "seconds": 310.0})
    block = readme.render_block({**SUMMARY, "stages": stages, "autointerp": AUTOINTERP}, "results/default/summary.json")
    assert ("Seed 0's autointerp took 1150 s (19.2 min): its notebook 840 s and the judge validation 310 s as a task "
            "of its own, beside other work (the judge validation set 300 s (once per run); the 10 pairs") in block
    assert "| 03_autointerp (2 runs + 1 task of its own) |" in block
    # the validation set answered from the run's cache (no request sent): the pairs give the judge's speed
    cached = {**AUTOINTERP, "validation_speed": {"seconds": 0.01, "n_requests": 0, "requests_per_s": None}}
    block = readme.render_block({**SUMMARY, "stages": stages, "autointerp": cached}, "results/default/summary.json")
    assert "on the pairs it answered 1900 requests, explanations included, in 500 s (3.80 per second)" in block
    assert "the judge validation set 0 s" not in block
    two = {"03_autointerp": {**stages["03_autointerp"], "concurrency": 2}}
    block = readme.render_block({**SUMMARY, "stages": two, "wall_s_total": 1000.0, "setup_s": 100.0,
                                 "autointerp": AUTOINTERP}, "results/default/summary.json")
    assert "with `--jobs 2` the stages overlap" in block
    assert "The executions took 19.2 min together: 64% of the 2 processes' 15.0 min after the setup." in block
    # several scores: significance after Holm's correction; nothing beats random on real latents: said
    many = {**AUTOINTERP, "vs_random": {"fuzz": {"diff": -0.01, "ci_low": -0.1, "ci_high": 0.08, "n": 10}},
            "joint_vs_solo": {"fuzz": {"delta": 0.1, "p": 0.026, "n_pairs": 10, "mde": 0.1},
                              "detection": {"delta": 0.0, "p": 0.5, "n_pairs": 10, "mde": 0.1},
                              "embedding": {"delta": 0.0, "p": None, "n_pairs": 10, "mde": 0.1}}}
    block = readme.render_block({**SUMMARY, "autointerp": many}, "results/default/summary.json")
    assert "p < 0.05 on fuzz alone, not significant after a Holm correction over the 3 scores." in block
    assert "On real latents no score told the explanations from random ones" in block
    assert readme.holm({"a": 0.01, "b": 0.02, "c": 0.03}) == ["a", "b", "c"]
    assert readme.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == ["a"]
    assert readme.holm({"a": 0.03, "b": None}) == [] and readme.holm({"a": 0.02, "b": None}) == ["a"]
    assert readme.holm({}) == []
    # autointerp on several seeds: pooled pairs, the time per seed, the test over seeds
    pooled = {**AUTOINTERP, "seeds": [0, 1], "pairs_speed": {"seconds": 700.0, "n_requests": 950},
              "joint_vs_solo_over_seeds": {"fuzz": {"delta": 0.03, "se": 0.02, "p": 0.37, "n_seeds": 2}}}
    stages = {"03_autointerp": {"concurrency": 2, "per_execution": [
        {"seed": None, "part": "judge validation", "seconds": 300.0}, {"seed": 0, "seconds": 360.0},
        {"seed": 1, "seconds": 380.0}]}}
    block = readme.render_block({**SUMMARY, "stages": stages, "autointerp": pooled}, "results/default/summary.json")
    assert "Autointerp (seeds 0, 1 pooled, judge `qwen2.5-coder-1.5b`" in block
    assert ("Autointerp took 1040 s of process time on 2 seeds, 8.7 min a seed: each seed's notebook 360-380 s, "
            "and the judge validation 300 s once per run, as a task of its own (the 10 pairs with every scorer and "
            "30 with the embedding scorer alone 700 s over the seeds (950 requests") in block
    assert "(10 matched pairs, seeds 0, 1 pooled)" in block
    # where the pairs' seconds went, when the run recorded it
    timed = {**pooled, "pairs_speed": {"seconds": 700.0, "n_requests": 950, "explain_s": 320.4, "score_s": 350.0,
                                       "other_s": 29.6, "n_explained": 38}}
    block = readme.render_block({**SUMMARY, "stages": stages, "autointerp": timed}, "results/default/summary.json")
    assert ("700 s over the seeds (950 requests to the explainer and judge; of these seconds, generating the 38 "
            "explanations took 320, the scorers 350 and the rest (contexts, loading the models) 30)") in block
    assert "**The same, seed by seed** (each seed's mean difference over its pairs as one observation, 2 seeds): " \
           "fuzz +0.030 ± 0.020 (p = 0.37); no score differs significantly." in block
    # no autointerp in the run: nothing about it, and no invented verdict
    assert "judge" not in readme.render_block(SUMMARY, "results/default/summary.json")
