"""The smoke profile end to end: bash run_all.sh through papermill, every notebook."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "profiles" / "smoke.toml"
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.py") if not p.name.startswith(("_", ".")))


@pytest.mark.slow
@pytest.mark.skipif(not SMOKE.is_file(), reason="profiles/smoke.toml does not exist yet")
@pytest.mark.skipif(not NOTEBOOKS, reason="notebooks/ holds no notebook yet")
def test_smoke_profile_end_to_end(tmp_path: Path) -> None:
    out, figures = tmp_path / "out", tmp_path / "figures"
    env = dict(os.environ, METASAE_FIGURES=str(figures))
    env.pop("METASAE_OUT", None)
    if sys.prefix != sys.base_prefix:  # run in the environment running the tests, not another one
        env["VIRTUAL_ENV"] = sys.prefix
    proc = subprocess.run(
        ["bash", str(ROOT / "run_all.sh"), "--profile", "smoke", "--seeds", "0,1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"run_all.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr

    results_md = (out / "results.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["profile"] == "smoke" and results["seeds"] == [0, 1]
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]
    assert results["artifacts"], "results.json lists no table or figure"

    # Every listed artefact is in results.md and exists; figures went to METASAE_FIGURES.
    for e in results["artifacts"]:
        assert e["name"] in results_md
        for p in e["paths"]:
            assert Path(p).is_file(), f"{e['name']}: {p} is listed but missing"
        if e["kind"] == "figure":
            assert {Path(p).suffix for p in e["paths"]} == {".png", ".pdf"}
            assert all(Path(p).parent == figures for p in e["paths"])
        else:
            assert {Path(p).suffix for p in e["paths"]} == {".csv", ".md"}
            assert all(Path(p).parent == out / "tables" for p in e["paths"])
    for link in re.findall(r"\]\(([^)]+)\)", results_md):
        assert (out / link).is_file(), f"results.md links to a missing file: {link}"

    # Every notebook ran (per-seed ones once per seed) without an error output.
    ran = {n["notebook"] for n in results["notebooks"]}
    assert ran == {p.name for p in NOTEBOOKS}
    for n in results["notebooks"]:
        nb = json.loads(Path(n["executed"]).read_text())
        errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{n['executed']} holds an error output: {errors[0].get('ename')}"

    # run_all.sh's --jobs 2: seed 0's training passes and the judge validation set ran as tasks of
    # their own (timed in their notebook's stage), and the notebooks found their work done
    parts = {name: {e.get("part") for e in st["per_execution"]} for name, st in results["stages"].items()}
    assert {"train pass 1 of 2", "train pass 2 of 2"} <= parts["01_train"]
    assert "judge validation" in parts["03_autointerp"]
    assert all(n.get("part") is None for n in results["notebooks"])
    trainer = json.loads((out / "seed0" / "checkpoints" / "trainer.json").read_text())
    assert trainer["complete"] and len(trainer["passes"]) == 2
    # the lambda2 = 0 control shares the solo's primary (trained once, evaluated once): its
    # reconstruction, |phi| and CE are the solo's, its meta SAE its own
    for seed in (0, 1):
        ev = json.loads((out / f"seed{seed}" / "metrics" / "eval.json").read_text())
        ctrl, solo = ev["joint_l0"], ev["solo"]
        assert ctrl["primary_of"] == "solo" and ctrl["run"]["name"] == "joint_l0"
        for k in ("mean_abs_phi", "mse", "explained_variance_std", "ce_loss_score", "l0_threshold"):
            assert ctrl[k] == solo[k], k
        assert math.isfinite(ctrl["meta_explained_variance"]) and "meta_explained_variance" not in solo
    # the notebook found the validation set scored by its task: the speed of the task's requests is kept
    val = json.loads((out / "autointerp" / "validation_summary.json").read_text())
    assert val["speed"]["n_requests"] > 0 and val["speed"]["requests_per_s"] > 0
