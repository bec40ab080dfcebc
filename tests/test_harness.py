"""The notebook harness (metasae.harness), the report helpers it relies on
(metasae.report), and run_all.sh's handling of bad input."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metasae import report
from metasae.machine import PROBE_ENV

ROOT = Path(__file__).resolve().parent.parent

TINY_PROFILE = """\
name = "tiny"
description = "harness test profile"
seeds = [0]
[model]
name = "tiny-test"
[data]
corpus = "none"
train_tokens = 4096
calib_tokens = 16
phi_tokens = 16
autointerp_tokens = 16
[sae]
d_in = 8
n_latents = 32
k = 2
[meta]
n_latents = 4
k = 1
[synthetic]
enabled = false
"""

PARAMS_AGGREGATE = """\
# %% tags=["parameters"]
profile = "tiny"
seeds = "0"
out_dir = "."
figures_dir = "."
"""

PARAMS_PER_SEED = """\
# metasae: per-seed
# %% tags=["parameters"]
profile = "tiny"
seed = 0
out_dir = "."
figures_dir = "."
"""

GOOD = PARAMS_AGGREGATE + """
# %%
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from metasae.report import save_figure, save_table

fig, ax = plt.subplots()
ax.plot([0, 1], [0, 1])
save_figure(fig, "fig_good", figures_dir, caption="A straight line.")
save_table([{"seeds": seeds, "value": 0.5}], "table_good", out_dir, caption="One row.")
"""

PER_SEED = PARAMS_PER_SEED + """
# %%
from metasae.report import save_table

save_table([{"seed": seed}], f"table_seed{seed}", out_dir)
"""

BAD = PARAMS_AGGREGATE + """
# %%
raise ValueError("boom from the bad notebook")
"""

# A cell tagged raises-exception does not stop papermill; the harness must still fail.
SILENT_ERROR = PARAMS_AGGREGATE + """
# %% tags=["raises-exception"]
1 / 0
"""

NO_PARAMETERS = """\
# %%
x = 1
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("METASAE_OUT", None)
    env.pop("METASAE_FIGURES", None)
    env[PROBE_ENV] = "0"  # the machine probe (a few seconds per run) only where a test asks for it
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    env.update(extra)
    return env


def _harness(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metasae.harness", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY_PROFILE)
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    return {"profile": profile, "notebooks": nbs, "out": tmp_path / "out", "figures": tmp_path / "figures"}


def _args(t: dict[str, Path], *extra: str) -> list[str]:
    return ["--profile", str(t["profile"]), "--notebooks", str(t["notebooks"]),
            "--out", str(t["out"]), "--figures", str(t["figures"]), *extra]


def _one_sentence_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# ---------------------------------------------------------------------------
# Bad input: one sentence, non-zero exit, no traceback
# ---------------------------------------------------------------------------


def test_unknown_profile_python_cli() -> None:
    msg = _one_sentence_error(_harness("--profile", "no-such-profile"))
    assert "no-such-profile" in msg


@pytest.mark.parametrize("seeds", ["0,x", "1,1", "", "-1", "0;1"])
def test_malformed_seeds_python_cli(tiny: dict[str, Path], seeds: str) -> None:
    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    msg = _one_sentence_error(_harness(*_args(tiny, "--seeds", seeds)))
    assert "--seeds" in msg


def test_unwritable_output_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = _args(tiny)
    args[args.index("--out") + 1] = str(blocker / "out")
    msg = _one_sentence_error(_harness(*args))
    assert "output folder" in msg and str(blocker) in msg


def test_unknown_option_and_unknown_notebook(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    _one_sentence_error(_harness(*_args(tiny, "--bogus")))
    msg = _one_sentence_error(_harness(*_args(tiny, "--only", "99_missing")))
    assert "99_missing" in msg


@pytest.mark.parametrize("argv, needle", [
    (["--profile", "no-such-profile"], "no-such-profile"),
    (["--seeds", "0,,1"], "--seeds"),
    (["--out", "/dev/null/out"], "output folder"),
    (["--jobs", "0"], "--jobs"),
])
def test_run_all_bad_input_fails_fast(argv: list[str], needle: str) -> None:
    """run_all.sh validates before any setup, corpus or notebook work."""
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh"), *argv], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert needle in _one_sentence_error(proc)
    assert "[setup]" not in proc.stderr


# ---------------------------------------------------------------------------
# Running notebooks
# ---------------------------------------------------------------------------


def test_good_notebook_writes_results(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    proc = _harness_env(_args(tiny, "--seeds", "3,4"), **{PROBE_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    out, figures = tiny["out"], tiny["figures"]
    results = (out / "results.md").read_text()
    for needle in ("fig_good", "table_good", "A straight line.", "tiny", "3,4", "git commit"):
        assert needle in results
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [3, 4] and data["profile"] == "tiny"
    kinds = {e["name"]: e for e in data["artifacts"]}
    assert set(kinds) == {"fig_good", "table_good"}
    assert kinds["fig_good"]["notebook"] == "01_good" and kinds["fig_good"]["seeds"] == [3, 4]
    for e in data["artifacts"]:
        for p in e["paths"]:
            assert Path(p).is_file()
    assert (figures / "fig_good.png").is_file() and (figures / "fig_good.pdf").is_file()
    assert (out / "tables" / "table_good.csv").read_text().splitlines()[1] == "\"3,4\",0.5"
    assert json.loads((out / "config.json").read_text())["seeds"] == [3, 4]
    executed = json.loads((out / "notebooks" / "01_good.ipynb").read_text())
    assert not [o for c in executed["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    # the machine's speed, probed before the first notebook and after the last (one process: --jobs 1)
    mach = data["machine"]
    assert set(mach) == {"before", "after"} and mach["before"]["at"] <= mach["after"]["at"]
    for rec in mach.values():
        assert rec["processes"] == 1 and len(rec["per_process"]) == 1, rec
        assert rec["bf16_gemm_gflops"] > 0 and rec["mem_triad_gbps"] > 0
    assert "Machine speed (`python -m metasae.machine`): before the run " in results
    assert "machine before the run: " in proc.stdout


def test_machine_probe_is_skipped_on_request(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    proc = _harness(*_args(tiny))  # _env sets METASAE_MACHINE_PROBE=0
    assert proc.returncode == 0, proc.stderr
    assert "machine" not in json.loads((tiny["out"] / "results.json").read_text())
    assert "Machine speed" not in (tiny["out"] / "results.md").read_text()


def test_failing_notebook_fails_the_run(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    (tiny["notebooks"] / "02_bad.py").write_text(BAD)
    (tiny["notebooks"] / "03_never.py").write_text(GOOD.replace("fig_good", "fig_never"))
    tiny["out"].mkdir(parents=True)
    (tiny["out"] / "results.md").write_text("stale results from an older run\n")
    proc = _harness(*_args(tiny))
    assert proc.returncode == 1
    msg = _one_sentence_error(proc)
    assert "02_bad.py" in msg and "boom from the bad notebook" in msg
    executed = tiny["out"] / "notebooks" / "02_bad.ipynb"
    assert str(executed) in msg and executed.is_file()
    assert not (tiny["out"] / "results.md").exists()
    assert not (tiny["out"] / "results.json").exists()
    assert not (tiny["out"] / "notebooks" / "03_never.ipynb").exists()


def test_error_output_without_exception_fails(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_silent.py").write_text(SILENT_ERROR)
    proc = _harness(*_args(tiny))
    msg = _one_sentence_error(proc)
    assert "01_silent.py" in msg and "ZeroDivisionError" in msg
    assert not (tiny["out"] / "results.md").exists()


def test_notebook_without_parameters_cell_is_refused(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_plain.py").write_text(NO_PARAMETERS)
    msg = _one_sentence_error(_harness(*_args(tiny)))
    assert "01_plain.py" in msg and "parameters" in msg


def test_per_seed_notebook_runs_once_per_seed(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_train.py").write_text(PER_SEED)
    (tiny["notebooks"] / "02_good.py").write_text(GOOD)
    proc = _harness(*_args(tiny, "--seeds", "0,1"))
    assert proc.returncode == 0, proc.stderr
    nb_dir = tiny["out"] / "notebooks"
    assert sorted(p.name for p in nb_dir.glob("*.ipynb")) == [
        "01_train.seed0.ipynb", "01_train.seed1.ipynb", "02_good.ipynb"]
    data = json.loads((tiny["out"] / "results.json").read_text())
    by_name = {e["name"]: e for e in data["artifacts"]}
    assert by_name["table_seed0"]["seed"] == 0 and by_name["table_seed1"]["seed"] == 1
    assert [(n["notebook"], n["seed"]) for n in data["notebooks"]] == [
        ("01_train.py", 0), ("01_train.py", 1), ("02_good.py", None)]
    results = (tiny["out"] / "results.md").read_text()
    assert "table_seed0" in results and "table_seed1" in results


def test_partial_run_merges_into_a_complete_one(tiny: dict[str, Path]) -> None:
    """--only with another seed after a complete run: the complete run's record survives, merged."""
    (tiny["notebooks"] / "01_train.py").write_text(PER_SEED)
    (tiny["notebooks"] / "02_good.py").write_text(GOOD)
    assert _harness(*_args(tiny, "--seeds", "0,1")).returncode == 0
    before = json.loads((tiny["out"] / "results.json").read_text())

    proc = _harness(*_args(tiny, "--only", "01_train", "--seeds", "3"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tiny["out"] / "results.json").read_text())
    names = {e["name"] for e in data["artifacts"]}
    assert {"table_seed0", "table_seed1", "table_seed3", "table_good", "fig_good"} <= names
    assert [(n["notebook"], n["seed"]) for n in data["notebooks"]] == [
        ("01_train.py", 0), ("01_train.py", 1), ("02_good.py", None), ("01_train.py", 3)]
    assert data["seeds"] == [0, 1, 3]
    assert data["stages"] == before["stages"] and data["wall_s_total"] == before["wall_s_total"]
    assert [u["seeds"] for u in data["updates"]] == [[3]] and data["updates"][0]["notebooks"] == ["01_train.py"]
    index = [json.loads(line) for line in (tiny["out"] / "artifacts.jsonl").read_text().splitlines()]
    assert {(e["name"], e.get("seed")) for e in index} >= {("table_seed0", 0), ("table_seed1", 1), ("table_seed3", 3)}
    assert json.loads((tiny["out"] / "config.json").read_text())["seeds"] == [0, 1, 3]
    md = (tiny["out"] / "results.md").read_text()
    for name in ("table_seed0", "table_seed1", "table_seed3", "fig_good", "updated by a partial run: 01_train.py"):
        assert name in md
    for link in re.findall(r"\]\(([^)]+)\)", md):
        assert (tiny["out"] / link).is_file(), link

    # re-running a seed of the complete run replaces its execution, keeps the others
    assert _harness(*_args(tiny, "--only", "01_train", "--seeds", "0")).returncode == 0
    data = json.loads((tiny["out"] / "results.json").read_text())
    assert sorted((n["notebook"], -1 if n["seed"] is None else n["seed"]) for n in data["notebooks"]) == [
        ("01_train.py", 0), ("01_train.py", 1), ("01_train.py", 3), ("02_good.py", -1)]
    assert len(data["updates"]) == 2

    # a partial run under other settings is refused before it runs anything
    tiny["profile"].write_text(TINY_PROFILE.replace("k = 2", "k = 3"))
    msg = _one_sentence_error(_harness(*_args(tiny, "--only", "01_train", "--seeds", "4")))
    assert "config.json differs" in msg
    assert not (tiny["out"] / "notebooks" / "01_train.seed4.ipynb").exists()
    assert json.loads((tiny["out"] / "results.json").read_text())["seeds"] == [0, 1, 3]


def test_only_runs_one_notebook_and_writes_no_results(tiny: dict[str, Path]) -> None:
    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    (tiny["notebooks"] / "02_bad.py").write_text(BAD)
    proc = _harness(*_args(tiny, "--only", "01_good"))
    assert proc.returncode == 0, proc.stderr
    assert (tiny["out"] / "notebooks" / "01_good.ipynb").is_file()
    assert not (tiny["out"] / "notebooks" / "02_bad.ipynb").exists()
    assert not (tiny["out"] / "results.md").exists()


def test_discover_marker_and_order(tmp_path: Path) -> None:
    from metasae.harness import discover

    (tmp_path / "02_b.py").write_text(PARAMS_AGGREGATE)
    (tmp_path / "01_a.py").write_text(PARAMS_PER_SEED)
    (tmp_path / "_helper.py").write_text("x = 1\n")
    (tmp_path / "03_c.py").write_text(PARAMS_AGGREGATE + "\n# metasae: per-seed\n" + "\n" * 40)
    found = discover(tmp_path)
    assert [(n.name, n.per_seed) for n in found] == [("01_a", True), ("02_b", False), ("03_c", True)]
    (tmp_path / "04_d.py").write_text("\n" * 40 + "# metasae: per-seed\n")
    assert discover(tmp_path)[-1].per_seed is False


# ---------------------------------------------------------------------------
# metasae.report
# ---------------------------------------------------------------------------


def test_save_table_list_of_dicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (report.INDEX_ENV, report.NOTEBOOK_ENV, report.SEED_ENV, report.SEEDS_ENV):
        monkeypatch.delenv(var, raising=False)
    rows = [{"config": "l0.1|s1", "dphi": -0.0751234567, "dead": 0}, {"config": "solo", "dphi": None, "extra": True}]
    csv_path, md_path = report.save_table(rows, "t1", tmp_path, caption="Table 1.")
    assert csv_path == tmp_path / "tables" / "t1.csv"
    assert csv_path.read_text().splitlines() == [
        "config,dphi,dead,extra", "l0.1|s1,-0.0751234567,0,", "solo,,,True"]
    md = md_path.read_text().splitlines()
    assert md[0] == "Table 1."
    assert md[2] == "| config | dphi | dead | extra |"
    assert md[4] == "| l0.1\\|s1 | -0.07512 | 0 |  |"
    entries = report.read_index(tmp_path / "artifacts.jsonl")
    assert [(e["kind"], e["name"], e["caption"]) for e in entries] == [("table", "t1", "Table 1.")]


def test_save_table_rows_with_columns_and_dataframe(tmp_path: Path) -> None:
    report.save_table([[1, 2.5], [3, 4.0]], "t2", tmp_path, columns=["a", "b"], index=tmp_path / "i.jsonl")
    assert (tmp_path / "tables" / "t2.csv").read_text() == "a,b\n1,2.5\n3,4.0\n"
    with pytest.raises(ValueError):
        report.save_table([[1, 2]], "t3", tmp_path)
    with pytest.raises(ValueError):
        report.save_table([{"a": 1}], "../escape", tmp_path)
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"x": [1, 2], "y": [0.25, 0.5]})
    report.save_table(df, "t4", tmp_path, index=tmp_path / "i.jsonl")
    assert (tmp_path / "tables" / "t4.csv").read_text() == "x,y\n1,0.25\n2,0.5\n"
    report.save_table(df.set_index("x"), "t5", tmp_path, index=tmp_path / "i.jsonl")
    assert (tmp_path / "tables" / "t5.csv").read_text().splitlines()[0] == "x,y"


def test_save_figure_and_index_under_harness_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = tmp_path / "out" / "artifacts.jsonl"
    monkeypatch.setenv(report.INDEX_ENV, str(index))
    monkeypatch.setenv(report.NOTEBOOK_ENV, "05_fig")
    monkeypatch.setenv(report.SEED_ENV, "2")
    monkeypatch.setenv(report.SEEDS_ENV, "1,2")
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    png, pdf = report.save_figure(fig, "fig1a", tmp_path / "figs", caption="Density.")
    first = png.read_bytes()
    report.save_figure(fig, "fig1a", tmp_path / "figs", caption="Density, again.")
    plt.close(fig)
    assert png.read_bytes() == first, "re-saving the same figure must give the same PNG"
    assert pdf.read_bytes().startswith(b"%PDF")
    assert not list((tmp_path / "figs").glob(".*tmp"))
    entries = report.read_index(index)
    assert len(entries) == 1
    e = entries[0]
    assert (e["kind"], e["notebook"], e["seed"], e["seeds"], e["caption"]) == (
        "figure", "05_fig", 2, [1, 2], "Density, again.")
    assert e["paths"] == [str(png.resolve()), str(pdf.resolve())]


def test_readme_documents_the_conventions_the_harness_uses() -> None:
    from metasae.harness import PER_SEED_MARKER

    text = (ROOT / "notebooks" / "README.md").read_text()
    assert PER_SEED_MARKER in text
    assert '# %% tags=["parameters"]' in text
    for name in ("profile", "seed", "seeds", "out_dir", "figures_dir", "save_figure", "save_table"):
        assert f"`{name}" in text


# ---------------------------------------------------------------------------
# --jobs: the seeds of a per-seed notebook side by side; stage timings
# ---------------------------------------------------------------------------

STAMPED_SEED = PARAMS_PER_SEED + """
# %%
import json, os, time
from pathlib import Path

start = time.time()
Path(out_dir, f"start_{seed}.json").write_text(json.dumps(start))
if seed == FAIL_SEED:
    raise RuntimeError(f"seed {seed} fails on purpose")
time.sleep(SLEEP_S)
Path(out_dir, f"stamp_{seed}.json").write_text(json.dumps({
    "start": start, "end": time.time(),
    **{k: os.environ.get(k) for k in ("METASAE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}}))
"""

STAMPED_AFTER = PARAMS_AGGREGATE + """
# %%
import json, time
from pathlib import Path

Path(out_dir, "after.json").write_text(json.dumps(time.time()))
"""


def _stamped(t: dict[str, Path], sleep_s: float = 2.0, fail_seed: int = -1) -> None:
    (t["notebooks"] / "01_seeds.py").write_text(
        STAMPED_SEED.replace("FAIL_SEED", str(fail_seed)).replace("SLEEP_S", str(sleep_s)))
    (t["notebooks"] / "02_after.py").write_text(STAMPED_AFTER)


def _harness_env(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    e = _env(**env)
    for name in ("METASAE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "METASAE_T0", "METASAE_JOBS"):
        if name not in env:
            e.pop(name, None)
    return subprocess.run([sys.executable, "-m", "metasae.harness", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=600)


def _stamps(out: Path, seeds: list[int]) -> list[dict]:
    return [json.loads((out / f"stamp_{s}.json").read_text()) for s in seeds]


def test_jobs_runs_seeds_side_by_side(tiny: dict[str, Path]) -> None:
    from metasae.harness import threads_per_process

    _stamped(tiny)
    t0 = __import__("time").time() - 100.0  # as if run_all.sh had spent 100 s on the setup
    proc = _harness_env(_args(tiny, "--seeds", "0,1", "--jobs", "2"), METASAE_T0=repr(t0))
    assert proc.returncode == 0, proc.stderr
    a, b = _stamps(tiny["out"], [0, 1])
    assert max(a["start"], b["start"]) < min(a["end"], b["end"]), "the two seeds did not overlap"
    after = json.loads((tiny["out"] / "after.json").read_text())
    assert after >= max(a["end"], b["end"]), "the next notebook started before every seed had finished"
    expected = str(threads_per_process(2))
    assert expected == str(max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else os.cpu_count() or 1) // 2))
    for s in (a, b):
        assert s["METASAE_THREADS"] == s["OMP_NUM_THREADS"] == s["MKL_NUM_THREADS"] == expected

    data = json.loads((tiny["out"] / "results.json").read_text())
    assert data["jobs"] == 2
    assert [(n["notebook"], n["seed"]) for n in data["notebooks"]] == [
        ("01_seeds.py", 0), ("01_seeds.py", 1), ("02_after.py", None)]
    stages = data["stages"]
    assert list(stages) == ["01_seeds", "02_after"]
    seeds_stage = stages["01_seeds"]
    per = seeds_stage["per_execution"]
    assert [x["seed"] for x in per] == [0, 1] and seeds_stage["concurrency"] == 2
    assert all(x["seconds"] >= 2.0 for x in per)
    assert max(x["seconds"] for x in per) <= seeds_stage["wall_s"] < sum(x["seconds"] for x in per)
    assert stages["02_after"]["per_execution"][0]["seed"] is None and stages["02_after"]["concurrency"] == 1
    assert data["wall_s_total_includes_setup"] is True
    assert data["wall_s_total"] >= 100.0 + seeds_stage["wall_s"]
    assert 100.0 <= data["setup_s"] < data["wall_s_total"]
    md = (tiny["out"] / "results.md").read_text()
    assert "## Wall time" in md and "| 01_seeds | 2 | 2 |" in md and "setup included" in md


def test_one_job_runs_seeds_one_after_another(tiny: dict[str, Path]) -> None:
    _stamped(tiny, sleep_s=1.0)
    # --jobs wins over METASAE_JOBS; without METASAE_T0 the total starts at the harness
    proc = _harness_env(_args(tiny, "--seeds", "0,1", "--jobs", "1"), METASAE_JOBS="2")
    assert proc.returncode == 0, proc.stderr
    a, b = _stamps(tiny["out"], [0, 1])
    assert a["end"] <= b["start"]
    assert a["METASAE_THREADS"] is None and a["OMP_NUM_THREADS"] is None  # the environment is untouched
    data = json.loads((tiny["out"] / "results.json").read_text())
    assert data["jobs"] == 1 and data["stages"]["01_seeds"]["concurrency"] == 1
    assert data["wall_s_total_includes_setup"] is False and "setup_s" not in data
    per = data["stages"]["01_seeds"]["per_execution"]
    assert data["stages"]["01_seeds"]["wall_s"] >= sum(x["seconds"] for x in per) - 0.01
    assert data["wall_s_total"] >= sum(st["wall_s"] for st in data["stages"].values())


def test_failing_seed_fails_a_parallel_run(tiny: dict[str, Path]) -> None:
    import time

    _stamped(tiny, sleep_s=60.0, fail_seed=1)
    tiny["out"].mkdir(parents=True)
    (tiny["out"] / "results.md").write_text("stale results from an older run\n")
    t0 = time.monotonic()
    proc = _harness_env(_args(tiny, "--seeds", "0,1", "--jobs", "2"))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1
    msg = _one_sentence_error(proc)
    assert "01_seeds.py (seed 1)" in msg and "fails on purpose" in msg and "stopped" in msg
    assert (tiny["out"] / "start_0.json").is_file(), "seed 0 should have been running"
    assert not (tiny["out"] / "stamp_0.json").exists(), "seed 0 should have been stopped"
    assert elapsed < 50, "the still-running seed was not stopped"
    assert not (tiny["out"] / "results.md").exists() and not (tiny["out"] / "results.json").exists()
    assert not (tiny["out"] / "after.json").exists()


def test_jobs_option_and_environment(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from metasae.harness import HarnessError, build_parser, parse_jobs, plan_from_args, threads_per_process

    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    parser = build_parser()
    monkeypatch.delenv("METASAE_JOBS", raising=False)
    assert plan_from_args(parser.parse_args(_args(tiny))).jobs == 1
    monkeypatch.setenv("METASAE_JOBS", "3")
    assert plan_from_args(parser.parse_args(_args(tiny))).jobs == 3
    assert plan_from_args(parser.parse_args(_args(tiny, "--jobs", "2"))).jobs == 2
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(HarnessError, match="--jobs"):
            parse_jobs(bad)
    monkeypatch.setenv("METASAE_JOBS", "zero")
    with pytest.raises(HarnessError, match="METASAE_JOBS"):
        plan_from_args(parser.parse_args(_args(tiny)))
    assert [threads_per_process(k, cpus=16) for k in (1, 2, 3, 4, 32)] == [16, 8, 5, 4, 1]
    assert threads_per_process(2, cpus=1) == 1
    # --check takes --jobs (run_all.sh passes every argument to it)
    proc = _harness_env(_args(tiny, "--check", "--jobs", "2"))
    assert proc.returncode == 0 and proc.stdout.strip() == "none", proc.stderr
    msg = _one_sentence_error(_harness_env(_args(tiny, "--check", "--jobs", "0")))
    assert "--jobs" in msg


def test_stage_timings_and_total_wall() -> None:
    from metasae.harness import Execution, Notebook, stage_timings, total_wall

    a, b = Notebook(Path("01_a.py"), True), Notebook(Path("02_b.py"), False)
    exs = [Execution(a, 0, Path("x"), 5.0, 100.0, 105.0, 2), Execution(a, 1, Path("y"), 7.0, 100.5, 107.5, 2),
           Execution(b, None, Path("z"), 1.25, 108.0, 109.25)]
    st = stage_timings(exs)
    assert st == {
        "01_a": {"wall_s": 7.5, "per_execution": [{"seed": 0, "seconds": 5.0}, {"seed": 1, "seconds": 7.0}],
                 "concurrency": 2},
        "02_b": {"wall_s": 1.25, "per_execution": [{"seed": None, "seconds": 1.25}], "concurrency": 1},
    }
    assert total_wall(1000.0, now=1060.0, env={}) == {"wall_s_total": 60.0, "wall_s_total_includes_setup": False}
    assert total_wall(1000.0, now=1060.0, env={"METASAE_T0": "900.5"}) == {
        "wall_s_total": 159.5, "wall_s_total_includes_setup": True, "setup_s": 99.5}
    for bad in ("", "not-a-time", "1700000000.N", "2000", "nan", "-5"):  # unparsable, or after the harness began
        assert total_wall(1000.0, now=1060.0, env={"METASAE_T0": bad})["wall_s_total_includes_setup"] is False


def test_run_all_sets_the_wall_clock_origin_first() -> None:
    lines = [ln.strip() for ln in (ROOT / "run_all.sh").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    assert commands[0] == 'export METASAE_T0="${METASAE_T0:-$(date +%s.%N)}"'


def test_git_state_is_taken_before_the_notebooks_write_into_the_tree(tiny: dict[str, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that regenerates tracked figures must not record the code it ran as dirty."""
    from metasae import harness

    (tiny["notebooks"] / "01_good.py").write_text(GOOD)
    calls = []

    def fake_state(root=None):
        calls.append(1)
        return "c0ffee", len(calls) > 1  # clean when the run starts, "dirty" once figures are written

    monkeypatch.setattr(harness, "git_state", fake_state)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    plan = harness.plan_from_args(harness.build_parser("t").parse_args(_args(tiny, "--seeds", "0", "--jobs", "1")))
    harness.run(plan)
    data = json.loads((tiny["out"] / "results.json").read_text())
    assert data["commit"] == "c0ffee" and data["dirty"] is False and len(calls) == 1


class _FlakyPapermill:
    """execute_notebook raising the given errors in turn, then succeeding."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def execute_notebook(self, *args: object, **kwargs: object) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def test_kernel_that_dies_while_starting_is_started_again(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from metasae import harness

    monkeypatch.setattr(harness.time, "sleep", lambda s: None)
    died = RuntimeError("Kernel died before replying to kernel_info")
    pm = _FlakyPapermill(died)
    assert harness._papermill("a.ipynb", "b.ipynb", {}, "python3", pm) == ""
    assert pm.calls == 2 and "starting it again (2 of 3)" in capsys.readouterr().err
    pm = _FlakyPapermill(*[died] * harness.KERNEL_START_TRIES)  # never starts: the failure is reported
    assert "Kernel died before replying" in harness._papermill("a.ipynb", "b.ipynb", {}, "python3", pm)
    assert pm.calls == harness.KERNEL_START_TRIES
    pm = _FlakyPapermill(ValueError("a cell failed"))  # a failure after cells ran is never retried
    assert harness._papermill("a.ipynb", "b.ipynb", {}, "python3", pm) == "ValueError: a cell failed"
    assert pm.calls == 1


# ---------------------------------------------------------------------------
# --jobs: the task graph (after / prepare directives)
# ---------------------------------------------------------------------------

STAMPED_AFTER_SEED = PARAMS_PER_SEED + """
# %%
import json, time
from pathlib import Path

Path(out_dir, f"chained_{seed}.json").write_text(json.dumps(time.time()))
"""

STAMPED_FREE = PARAMS_AGGREGATE + """
# %%
import json, time
from pathlib import Path

Path(out_dir, "free.json").write_text(json.dumps(time.time()))
"""


def _with_header(body: str, directives: str) -> str:
    return f"# ---\n# jupyter:\n#   metasae: {directives}\n# ---\n" + body.replace("# metasae: per-seed\n", "")


def test_graph_runs_a_seed_on_while_another_still_trains(tiny: dict[str, Path]) -> None:
    """A per-seed notebook `after` a per-seed one waits for the same seed only; a notebook `after
    nothing` starts at once; a notebook without `after` waits for everything before it."""
    nbs = tiny["notebooks"]
    (nbs / "01_seeds.py").write_text(_with_header(
        STAMPED_SEED.replace("FAIL_SEED", "-1").replace("time.sleep(SLEEP_S)", "time.sleep(8.0 if seed == 0 else 0.2)"),
        "per-seed"))
    (nbs / "02_chained.py").write_text(_with_header(STAMPED_AFTER_SEED, "per-seed; after 01_seeds"))
    (nbs / "03_free.py").write_text(_with_header(STAMPED_FREE, "after nothing"))
    (nbs / "04_after.py").write_text(STAMPED_AFTER)
    proc = _harness_env(_args(tiny, "--seeds", "0,1", "--jobs", "3"))
    assert proc.returncode == 0, proc.stderr
    out = tiny["out"]
    a, b = _stamps(out, [0, 1])
    chained = {s: json.loads((out / f"chained_{s}.json").read_text()) for s in (0, 1)}
    free, after = (json.loads((out / f"{n}.json").read_text()) for n in ("free", "after"))
    assert chained[1] < a["end"], "seed 1 waited for seed 0 of the notebook before"
    assert chained[0] >= a["end"] and chained[1] >= b["end"]
    assert free < a["end"], "the notebook after nothing waited"
    assert after >= max(a["end"], b["end"], *chained.values(), free)
    data = json.loads((out / "results.json").read_text())
    assert [(n["notebook"], n["seed"]) for n in data["notebooks"]] == [
        ("01_seeds.py", 0), ("01_seeds.py", 1), ("02_chained.py", 0), ("02_chained.py", 1), ("03_free.py", None),
        ("04_after.py", None)]
    assert list(data["stages"]) == ["01_seeds", "02_chained", "03_free", "04_after"]
    assert data["stages"]["01_seeds"]["concurrency"] >= 2


def test_directives_are_parsed_and_checked(tmp_path: Path) -> None:
    from metasae.harness import HarnessError, Prepare, discover

    (tmp_path / "01_a.py").write_text(_with_header(PARAMS_PER_SEED, "per-seed; after nothing; prepare train_passes"))
    (tmp_path / "02_b.py").write_text(_with_header(
        PARAMS_PER_SEED, "per-seed ; after 01_a; prepare judge_validation after 01_a"))
    (tmp_path / "03_c.py").write_text(PARAMS_AGGREGATE)
    a, b, c = discover(tmp_path)
    assert (a.per_seed, a.after, a.prepare) == (True, (), (Prepare("train_passes", None),))
    assert (b.per_seed, b.after, b.prepare) == (True, ("01_a",), (Prepare("judge_validation", ("01_a",)),))
    assert (c.per_seed, c.after, c.prepare) == (False, None, ())
    for bad, needle in (("after 04_later", "names no earlier notebook"), ("after 03_c", "names no earlier notebook"),
                        ("prepare nothing_known", "unknown preparation"), ("per seed", "unknown directive")):
        (tmp_path / "03_c.py").write_text(_with_header(PARAMS_AGGREGATE, bad))
        with pytest.raises(HarnessError, match=needle):
            discover(tmp_path)


def test_default_task_graph_chains_seeds_and_prepares_passes_and_validation() -> None:
    """The real notebooks under the default profile: seed 0 trains in two passes (tasks of their
    own), each seed's evaluation waits for its own training only, autointerp for its evaluation
    and the judge validation, which waits for the harvest only; priorities are critical paths."""
    from metasae.config import load_profile
    from metasae.harness import NOTEBOOK_DIR, Plan, build_tasks, discover

    prof = load_profile("default")
    plan = Plan(prof, list(prof.seeds), Path("/nonexistent/out"), Path("/nonexistent/fig"), discover(NOTEBOOK_DIR),
                False, jobs=2)
    tasks = build_tasks(plan, history={})
    key = {(t.notebook.name, t.seed, t.part): j for j, t in enumerate(tasks)}
    dep = lambda j: {(tasks[d].notebook.name, tasks[d].seed, tasks[d].part) for d in tasks[j].deps}  # noqa: E731
    passes = [k for k in key if k[2] and k[0] == "01_train"]
    assert passes == [("01_train", 0, "train pass 1 of 2"), ("01_train", 0, "train pass 2 of 2")]
    assert tasks[key[passes[1]]].kwargs == {"seed": 0, "index": 1} and tasks[key[passes[1]]].call == "train_pass"
    assert dep(key[("01_train", 0, None)]) == {("00_activations", None, None), *passes}
    assert dep(key[("01_train", 1, None)]) == {("00_activations", None, None)}
    assert dep(key[("02_cooccurrence", 3, None)]) == {("01_train", 3, None)}
    val = ("03_autointerp", None, "judge validation")
    assert dep(key[val]) == {("00_activations", None, None)}
    assert dep(key[("03_autointerp", 0, None)]) == {("02_cooccurrence", 0, None), val}
    assert dep(key[("04_splitting", None, None)]) == {("02_cooccurrence", s, None) for s in prof.seeds}
    assert dep(key[("07_synthetic", None, None)]) == {("00_activations", None, None)}
    assert ("03_autointerp", 0, None) in {(tasks[d].notebook.name, tasks[d].seed, None)
                                          for d in tasks[key[("08_browser", None, None)]].deps}
    for j, t in enumerate(tasks):  # a task waits only for earlier ones; priority = est + longest chain after
        assert all(d < j for d in t.deps)
        after = [tasks[c].priority for c in range(len(tasks)) if j in tasks[c].deps]
        assert t.priority == pytest.approx(t.est + max(after, default=0.0))
    # with timings of an earlier run where seed 0 trained inside its notebook, each pass inherits its share
    hist = {("01_train", 0, None): 1500.0, ("03_autointerp", 0, None): 900.0}
    tasks = build_tasks(plan, history=hist)
    shares = [tasks[key[p]].est for p in passes]
    assert sum(shares) == pytest.approx(1500.0) and all(0 < e < 1500 for e in shares)
    assert tasks[key[("03_autointerp", 0, None)]].est == 900.0
    # --only: the notebooks outside the plan count as done
    only = Plan(prof, [1], plan.out, plan.figures, [nb for nb in plan.notebooks if nb.name == "02_cooccurrence"],
                True, jobs=2)
    assert [(t.notebook.name, t.seed, t.deps) for t in build_tasks(only, history={})] == [("02_cooccurrence", 1, [])]
