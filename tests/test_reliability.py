"""Reliability: kill -9 and resume, checkpoint integrity, configuration drift, non-finite data.

The resume test runs a real training subprocess (a small driver written into
the test's tmp folder), kills it with SIGKILL at chosen points, reruns the same
command and compares the final weights bitwise with an uninterrupted run.  The
kill points are deterministic: the driver announces ``PAUSED`` on stdout and
sleeps at the requested point (a batch request, a run's step-folder write, the
atomic ``trainer.json`` commit), and the test kills it there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from metasae.checkpoint import STATE_FILE, load_trained_run, step_dirname
from metasae.config import ConfigError, MetaConfig, RunSpec, SAEConfig, TrainConfig
from metasae.io import IntegrityError
from metasae.trainer import FanOutTrainer, TrainingError

N_STEPS = 15
D, B = 16, 32
RUN_NAMES = ["solo", "joint_l0.3_s1", "joint_l0", "ortho_c0.1"]

DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    import torch

    import metasae.trainer as T
    from metasae.config import MetaConfig, RunSpec, SAEConfig, TrainConfig

    N_STEPS, D, B = {n_steps}, {d}, {b}
    pause = os.environ.get("PAUSE_AT", "")


    def hold(tag):
        if pause == tag:
            print("PAUSED " + tag, flush=True)
            time.sleep(600)


    def batches(start):
        # batch i is a function of (seed, i) only: a resumed run sees the same data order
        for i in range(start, N_STEPS):
            hold(f"batch:{{i}}")
            g = torch.Generator().manual_seed(12345 + i)
            scale = torch.linspace(0.5, 3.0, D)
            yield torch.randn(B, D, generator=g) * scale + 0.1 * i


    orig_write = T.write_run_step


    def write_run_step(run_dir, step, spec, *args, **kwargs):
        hold(f"write:{{step}}:{{spec.name}}")
        return orig_write(run_dir, step, spec, *args, **kwargs)


    orig_json = T.atomic_write_json


    def atomic_write_json(path, obj):
        orig_json(path, obj)
        if Path(path).name == T.TRAINER_FILE:
            hold(f"trainer:{{obj['step']}}")


    orig_export = T.export_saelens


    def export_saelens(sae, folder, *args, **kwargs):
        hold(f"export:{{Path(folder).parent.name}}")
        return orig_export(sae, folder, *args, **kwargs)


    T.write_run_step = write_run_step
    T.export_saelens = export_saelens
    T.atomic_write_json = atomic_write_json

    sae = SAEConfig(d_in=D, n_latents=64, k=4, aux_k=8, dead_after_tokens=64)
    meta = MetaConfig(n_latents=8, k=2, n_primary_steps=2, n_meta_steps=2)
    train = TrainConfig(batch_size=B, checkpoint_every_steps=3, eval_every_steps=2, threads=1)
    runs = [
        RunSpec("solo", "solo", seed=3),
        RunSpec("joint_l0.3_s1", "joint", seed=3, lambda2=0.3, sigma2=1.0),
        RunSpec("joint_l0", "joint", seed=3, lambda2=0.0, sigma2=1.0),
        RunSpec("ortho_c0.1", "ortho", seed=3, ortho_coef=0.1),
    ]
    T.FanOutTrainer(sae, meta, train, runs, ckpt_root=sys.argv[1], progress=False).train(batches, N_STEPS)
    print("DONE", flush=True)
    """
).format(n_steps=N_STEPS, d=D, b=B)


def _start_driver(driver: Path, ckpt: Path, pause: str = "") -> subprocess.Popen:
    env = {**os.environ, "PAUSE_AT": pause, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(driver), str(ckpt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "DONE" in out


def _kill_at(driver: Path, ckpt: Path, pause: str) -> None:
    """Run the driver until it reports `pause`, then SIGKILL it."""
    proc = _start_driver(driver, ckpt, pause)
    line = proc.stdout.readline()  # blocks until the driver pauses (or dies)
    if not line.startswith("PAUSED"):
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"driver never reached {pause!r}: {line!r}\n{err}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _committed(ckpt: Path) -> dict | None:
    p = ckpt / "trainer.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _final_files(ckpt: Path) -> dict[str, bytes]:
    files = {}
    for name in RUN_NAMES:
        final = ckpt / name / step_dirname(N_STEPS)
        for fname in ("sae.safetensors", "meta.safetensors", STATE_FILE):
            if (final / fname).is_file():
                files[f"{name}/{fname}"] = (final / fname).read_bytes()
        for fname in ("sae_weights.safetensors", "cfg.json"):
            files[f"{name}/saelens/{fname}"] = (ckpt / name / "saelens" / fname).read_bytes()
    return files


def test_kill9_at_several_points_then_resume_is_bitwise_identical(tmp_path):
    driver = tmp_path / "train_driver.py"
    driver.write_text(DRIVER)
    ref_ckpt, ckpt = tmp_path / "reference", tmp_path / "resumed"
    reference_proc = _start_driver(driver, ref_ckpt)  # the uninterrupted run, alongside

    # inside the first commit (three runs' step folders written): nothing committed yet
    _kill_at(driver, ckpt, "write:3:ortho_c0.1")
    assert _committed(ckpt) is None
    # steps 0..4 done, last commit at 3
    _kill_at(driver, ckpt, "batch:5")
    assert _committed(ckpt)["step"] == 3
    # steps 0..8 done, inside the commit of step 9: the first run's folder is written, the others not
    _kill_at(driver, ckpt, "write:9:joint_l0.3_s1")
    assert _committed(ckpt)["step"] == 6
    # right after the commit of step 12, before the older step folders are removed
    _kill_at(driver, ckpt, "trainer:12")
    assert _committed(ckpt)["step"] == 12
    # inside the final SAELens export: the run must not count as complete
    _kill_at(driver, ckpt, "export:joint_l0")
    assert not _committed(ckpt)["complete"]
    # the same command, to completion; then once more (a completed run is only reloaded)
    _finish(_start_driver(driver, ckpt))
    _finish(reference_proc)
    reference = _final_files(ref_ckpt)
    assert sum(k.endswith("/meta.safetensors") for k in reference) == 2  # both joint runs carry a meta SAE

    resumed = _final_files(ckpt)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert resumed[key] == reference[key], f"{key} differs from the uninterrupted run"
    # nothing stale left that could be mistaken for a result
    for name in RUN_NAMES:
        steps = sorted(p.name for p in (ckpt / name).iterdir() if p.name.startswith("step"))
        assert steps == [step_dirname(N_STEPS)], f"{name} keeps stale step folders {steps}"
    assert _committed(ckpt)["complete"] and _committed(ckpt)["step"] == N_STEPS
    # a finished run loads through the public API with verified checksums
    run = load_trained_run(ckpt, "joint_l0.3_s1")
    assert run.meta is not None and run.history


# ---------------------------------------------------------------------------
# In-process checks on a tiny fan-out
# ---------------------------------------------------------------------------

SAE = SAEConfig(d_in=8, n_latents=32, k=2, aux_k=4, dead_after_tokens=32)
META = MetaConfig(n_latents=4, k=1, n_primary_steps=2, n_meta_steps=1)
TRAIN = TrainConfig(batch_size=16, checkpoint_every_steps=2, eval_every_steps=2, threads=1, autocast="none")
RUNS = [RunSpec("solo", "solo", seed=1), RunSpec("joint", "joint", seed=1, lambda2=0.3, sigma2=1.0)]


def _batches(n_steps: int, nan_at: int | None = None, inf_at: int | None = None):
    def source(start: int):
        for i in range(start, n_steps):
            x = torch.randn(TRAIN.batch_size, SAE.d_in, generator=torch.Generator().manual_seed(i))
            if i == nan_at:
                x[3, 2] = float("nan")
            if i == inf_at:
                x[0, 0] = float("inf")
            yield x
    return source


def _train(ckpt: Path, n_steps: int = 4, runs=RUNS, sae=SAE, hint: str = "", **kw):
    trainer = FanOutTrainer(sae, META, TRAIN, runs, ckpt_root=ckpt, progress=False, rebuild_hint=hint)
    return trainer.train(_batches(n_steps, **kw), n_steps)


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("trained") / "ckpt"
    _train(ckpt)
    return ckpt


@pytest.fixture
def trained(_trained_once, tmp_path) -> Path:
    """A completed 4-step fan-out (solo + joint), a private copy per test."""
    return Path(shutil.copytree(_trained_once, tmp_path / "ckpt"))


@pytest.mark.parametrize("fname", ["sae.safetensors", "meta.safetensors", "state.safetensors", "cfg.json"])
@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_checkpoint_file_is_named_with_rebuild_command(trained, fname, damage):
    target = trained / "joint" / step_dirname(4) / fname
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:  # same size, one byte flipped
        data[len(data) - 3] ^= 0x01
        target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as exc:
        load_trained_run(trained, "joint", rebuild_hint="python -m metasae.pipeline train --profile smoke")
    msg = str(exc.value)
    assert str(target) in msg
    assert "python -m metasae.pipeline train --profile smoke" in msg
    # resuming from a damaged commit refuses too, naming the file and the caller's rebuild command
    with pytest.raises(IntegrityError) as exc:
        _train(trained, n_steps=4, hint="bash run_all.sh --profile smoke")
    assert str(target) in str(exc.value) and "bash run_all.sh --profile smoke" in str(exc.value)


def test_damaged_intermediate_checkpoint_stops_the_resume(tmp_path):
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingError):
        _train(ckpt, n_steps=6, nan_at=3)  # dies after the commit of step 2
    target = ckpt / "solo" / step_dirname(2) / "sae.safetensors"
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(IntegrityError) as exc:
        _train(ckpt, n_steps=6)
    assert str(target) in str(exc.value) and f"delete {ckpt}" in str(exc.value)  # the default hint


def test_missing_checksums_means_incomplete(trained):
    (trained / "solo" / step_dirname(4) / "checksums.json").unlink()
    with pytest.raises(IntegrityError, match="incomplete"):
        load_trained_run(trained, "solo")


@pytest.mark.parametrize("change", ["sae_k", "run_lambda2", "extra_run", "n_steps", "batch_size"])
def test_changed_configuration_on_same_folder_is_refused_and_nothing_deleted(trained, change):
    before = sorted((p.relative_to(trained), p.stat().st_size, p.stat().st_mtime_ns)
                    for p in trained.rglob("*") if p.is_file())
    sae, runs, n_steps, train = SAE, RUNS, 4, TRAIN
    if change == "sae_k":
        sae = SAEConfig(**{**SAE.__dict__, "k": 3})
    elif change == "run_lambda2":
        runs = [RUNS[0], RunSpec("joint", "joint", seed=1, lambda2=1.0, sigma2=1.0)]
    elif change == "extra_run":
        runs = RUNS + [RunSpec("ortho", "ortho", seed=1, ortho_coef=0.1)]
    elif change == "n_steps":
        n_steps = 6
    else:
        train = TrainConfig(**{**TRAIN.__dict__, "batch_size": 8})
    with pytest.raises(ConfigError) as exc:
        FanOutTrainer(sae, META, train, runs, ckpt_root=trained, progress=False).train(_batches(n_steps), n_steps)
    msg = str(exc.value)
    assert str(trained) in msg and "different configuration" in msg
    after = sorted((p.relative_to(trained), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in trained.rglob("*") if p.is_file())
    assert after == before


@pytest.mark.parametrize("where", ["nan", "inf"])
def test_non_finite_batch_stops_with_stage_and_step(tmp_path, where):
    kw = {"nan_at": 3} if where == "nan" else {"inf_at": 3}
    with pytest.raises(TrainingError) as exc:
        _train(tmp_path / "ckpt", n_steps=6, **kw)
    msg = str(exc.value)
    assert "step 3" in msg and "training" in msg and "non-finite" in msg
    # the last commit (step 2) is intact and the failure left no later step folder behind
    tr = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    assert tr["step"] == 2 and not tr["complete"]
    assert not (tmp_path / "ckpt" / "solo" / step_dirname(4)).exists()


def test_non_finite_primary_loss_names_run_stage_and_step(tmp_path, monkeypatch):
    import metasae.trainer as T

    real = T.decomposability_penalty_grad_
    calls = {"n": 0}

    def poisoned(*a):
        calls["n"] += 1
        pen = real(*a)
        return pen * float("nan") if calls["n"] == 3 else pen

    monkeypatch.setattr(T, "decomposability_penalty_grad_", poisoned)
    with pytest.raises(TrainingError) as exc:
        _train(None, n_steps=6)
    msg = str(exc.value)
    assert "run joint" in msg and "step 2" in msg and "stage: training" in msg


def test_non_finite_meta_loss_names_run_stage_and_step(monkeypatch):
    from metasae.sae import BatchTopKSAE

    real = BatchTopKSAE.train_step

    def poisoned(self, x, *a, **kw):
        out = real(self, x, *a, **kw)
        if self.cfg.n_latents == META.n_latents:  # the meta SAE
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(BatchTopKSAE, "train_step", poisoned)
    with pytest.raises(TrainingError) as exc:
        _train(None, n_steps=4)
    msg = str(exc.value)
    assert "run joint" in msg and "step 1" in msg and "meta step 0" in msg


def test_wrong_batch_shape_names_step(tmp_path):
    def source(start):
        for i in range(start, 4):
            yield torch.randn(TRAIN.batch_size, SAE.d_in + (1 if i == 2 else 0))

    with pytest.raises(TrainingError, match="step 2.*sae.d_in"):
        FanOutTrainer(SAE, META, TRAIN, RUNS, progress=False).train(source, 4)


def test_short_batch_source_names_step():
    with pytest.raises(TrainingError, match="ended at step 3 of 5"):
        FanOutTrainer(SAE, META, TRAIN, RUNS, progress=False).train(_batches(3), 5)


def test_meta_size_not_above_meta_k_is_refused_at_construction():
    bad = [RunSpec("joint_m1", "joint", seed=1, lambda2=0.3, sigma2=1.0, meta_latents=1)]
    with pytest.raises(ConfigError, match=r"run joint_m1: meta_latents \(1\) must be larger than meta.k \(1\)"):
        FanOutTrainer(SAE, META, TRAIN, bad, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checksums_file_is_an_integrity_error(trained, damage):
    target = trained / "joint" / step_dirname(4) / "checksums.json"
    text = target.read_text()
    target.write_text(text[: len(text) // 2] if damage == "truncate" else '["not", "a", "table"]')
    with pytest.raises(IntegrityError) as exc:
        load_trained_run(trained, "joint", rebuild_hint="bash run_all.sh --profile smoke")
    assert str(target) in str(exc.value) and "bash run_all.sh --profile smoke" in str(exc.value)


def test_damaged_trainer_commit_is_an_integrity_error(trained):
    target = trained / "trainer.json"
    target.write_text(target.read_text()[:20])
    with pytest.raises(IntegrityError) as exc:
        _train(trained, n_steps=4, hint="bash run_all.sh --profile smoke")
    assert str(target) in str(exc.value) and "bash run_all.sh --profile smoke" in str(exc.value)
    with pytest.raises(IntegrityError) as exc:
        load_trained_run(trained, "solo", rebuild_hint="bash run_all.sh --profile smoke")
    assert str(target) in str(exc.value)


@pytest.mark.parametrize("stage", ["primary", "meta"])
def test_non_finite_loss_is_noted_on_the_device_and_stops_before_a_commit(tmp_path, monkeypatch, stage):
    """The loss is not read each step (a host sync on a GPU): the first non-finite one is kept on
    the device, reported with its step at the next check, and nothing after the last commit is saved."""
    import metasae.trainer as trainer_mod

    if stage == "primary":
        real, calls = trainer_mod.orthogonality_penalty_grad_, {"n": 0}

        def penalty(*a, **kw):
            calls["n"] += 1
            out = real(*a, **kw)
            return out * float("nan") if calls["n"] == 4 else out  # primary step 3 (0-based)

        monkeypatch.setattr(trainer_mod, "orthogonality_penalty_grad_", penalty)
        runs = [RunSpec("ortho", "ortho", seed=1, ortho_coef=0.1)]
        want = "non-finite loss in run ortho at primary step 3 (stage: training)"
    else:
        real_fwd, calls = trainer_mod.BatchTopKSAE.train_step, {"n": 0}

        def train_step(self, x, *a, **kw):
            out = real_fwd(self, x, *a, **kw)
            if self.cfg.n_latents == META.n_latents:  # the meta SAE
                calls["n"] += 1
                if calls["n"] == 2:  # the meta step after primary step 3
                    return out._replace(loss=out.loss * float("nan"))
            return out

        monkeypatch.setattr(trainer_mod.BatchTopKSAE, "train_step", train_step)
        runs = [RunSpec("joint", "joint", seed=1, lambda2=0.3, sigma2=1.0)]
        want = "non-finite meta loss in run joint after primary step 3 (stage: meta step 0)"
    with pytest.raises(TrainingError) as exc:
        _train(tmp_path / "ckpt", n_steps=6, runs=runs)
    assert want in str(exc.value)
    tr = json.loads((tmp_path / "ckpt" / "trainer.json").read_text())
    assert tr["step"] == 2 and not tr["complete"]  # the commit at step 4 never happened


def test_runs_trained_in_passes_equal_one_pass_and_resume_by_pass(tmp_path):
    """train.runs_per_pass: each pass reads the same batches again; every run's weights and history
    equal those of one pass with every run (fp32, bitwise), and a kill in the second pass resumes it
    without training the first again."""
    from metasae.checkpoint import pass_trainer_file, read_trainer
    from metasae.trainer import train_in_passes

    runs = RUNS + [RunSpec("ortho", "ortho", seed=1, ortho_coef=0.1)]
    n_steps = 6
    FanOutTrainer(SAE, META, TRAIN, runs, ckpt_root=tmp_path / "one", progress=False).train(_batches(n_steps), n_steps)
    passes = [runs[:1], runs[1:]]
    reads = {"n": 0}

    def killed_in_pass_two(start: int):
        reads["n"] += 1
        for i, x in enumerate(_batches(n_steps)(start), start):
            if reads["n"] == 2 and i == 5:
                raise KeyboardInterrupt  # after the commit at step 4 of the second pass
            yield x

    with pytest.raises(KeyboardInterrupt):
        train_in_passes(SAE, META, TRAIN, passes, killed_in_pass_two, n_steps, tmp_path / "two", progress=False)
    assert read_trainer(tmp_path / "two") is None  # not complete: no trainer.json yet
    first = read_trainer(tmp_path / "two", name=pass_trainer_file(0))
    second = read_trainer(tmp_path / "two", name=pass_trainer_file(1))
    assert first["complete"] and first["runs"] == ["solo"] and second["step"] == 4 and not second["complete"]
    solo_files = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "two" / "solo").rglob("*") if p.is_file())
    train_in_passes(SAE, META, TRAIN, passes, _batches(n_steps), n_steps, tmp_path / "two", progress=False)
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "two" / "solo").rglob("*") if p.is_file()) == solo_files
    tr = read_trainer(tmp_path / "two")
    assert tr["complete"] and tr["runs"] == [r.name for r in runs] and tr["step"] == n_steps
    for r in runs:
        a, b = load_trained_run(tmp_path / "one", r.name), load_trained_run(tmp_path / "two", r.name)
        for k, v in a.sae.state_dict().items():
            assert torch.equal(v, b.sae.state_dict()[k]), (r.name, k)
        if a.meta is not None:
            for k, v in a.meta.state_dict().items():
                assert torch.equal(v, b.meta.state_dict()[k]), (r.name, "meta", k)
        strip = [[{k: v for k, v in h.items() if k != "tokens_per_s"} for h in t.history] for t in (a, b)]
        assert strip[0] == strip[1], r.name


def test_runs_per_pass_cuts_the_run_list_and_the_memory_plan():
    from metasae.config import load_profile

    p = load_profile("default")
    runs = p.runs_for_seed(0)
    # the control shares the solo's primary (config.primary_owner): it rides in the solo's pass,
    # right after it, and is not counted against runs_per_pass
    first = p.train_passes(0)
    assert [len(g) for g in first] == [8, 7] and [len(g) for g in p.train_passes(1)] == [4]
    assert [r.name for r in first[0][:2]] == ["solo", "joint_l0"]
    p.train.runs_per_pass = 0  # every run in one pass
    one = p.train_memory_bytes(0)
    p.train.runs_per_pass = 4
    passes = p.train_passes(0)
    own = [r.name for r in runs if r.name != "joint_l0"]
    assert [r.name for g in passes for r in g if r.name != "joint_l0"] == own
    assert [len(g) for g in passes] == [4, 4, 3, 4] and passes[0][1].name == "joint_l0"
    assert p.train_memory_bytes(0) < one / 2


def test_passes_trained_one_at_a_time_then_combined_equal_one_pass(tmp_path):
    """``only``: each pass trained alone (as the harness does, side by side, here in reverse order)
    writes its own runs and record but no trainer.json; the call over every pass then finds them
    complete, trains nothing and writes trainer.json; every run equals one pass with every run."""
    from metasae.checkpoint import pass_trainer_file, read_trainer
    from metasae.trainer import train_in_passes

    runs = RUNS + [RunSpec("ortho", "ortho", seed=1, ortho_coef=0.1)]
    n_steps = 6
    FanOutTrainer(SAE, META, TRAIN, runs, ckpt_root=tmp_path / "one", progress=False).train(_batches(n_steps), n_steps)
    passes = [runs[:2], runs[2:]]
    for i in (1, 0):
        train_in_passes(SAE, META, TRAIN, passes, _batches(n_steps), n_steps, tmp_path / "two", progress=False, only=i)
        assert read_trainer(tmp_path / "two", name=pass_trainer_file(i))["complete"]
        assert read_trainer(tmp_path / "two") is None
    files = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "two").rglob("*")
                   if p.is_file() and p.name != "trainer.json")

    def no_batches(start: int):
        raise AssertionError("a complete pass read batches")

    train_in_passes(SAE, META, TRAIN, passes, no_batches, n_steps, tmp_path / "two", progress=False)
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "two").rglob("*")
                  if p.is_file() and p.name != "trainer.json") == files
    assert read_trainer(tmp_path / "two")["runs"] == [r.name for r in runs]
    for r in runs:
        a, b = load_trained_run(tmp_path / "one", r.name), load_trained_run(tmp_path / "two", r.name)
        for k, v in a.sae.state_dict().items():
            assert torch.equal(v, b.sae.state_dict()[k]), (r.name, k)
    with pytest.raises(ConfigError, match="training pass 2 does not exist"):
        train_in_passes(SAE, META, TRAIN, passes, _batches(n_steps), n_steps, tmp_path / "two", progress=False, only=2)


_ALLOC_PROBE = """
import resource, torch
from metasae.allocator import keep_freed_memory
ok = keep_freed_memory()
from metasae.config import SAEConfig
from metasae.sae import BatchTopKSAE, meta_reconstruction
torch.set_num_threads(1)
sae = BatchTopKSAE(SAEConfig(d_in=576, n_latents=2304, k=32, dead_after_tokens=4096, aux_k=256), seed=0)
meta = BatchTopKSAE(SAEConfig(d_in=576, n_latents=207, k=8, dead_after_tokens=11520, aux_k=207), seed=1)
x = torch.randn(1024, 576, generator=torch.Generator().manual_seed(0))
def step():  # a joint step at the default shape: primary, penalty target, meta step
    sae.train_step(x, True)
    meta_reconstruction(meta, sae.W_dec_FD, True)
    meta.train_step(sae.W_dec_FD.detach(), True)
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step()
print(ok, keep_freed_memory(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) // 6)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_allocator_keeps_freed_blocks_so_a_step_faults_no_pages_unless_told_not_to():
    env = {k: v for k, v in os.environ.items() if k != "METASAE_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _ALLOC_PROBE], env=env, capture_output=True, text=True, check=True)
    ok, again, faults = out.stdout.split()
    # glibc's defaults cost up to ~6,800 page faults per such step (whether they do depends on
    # the process's history: its mmap threshold moves); kept blocks cost none of their own, but
    # the kernel may still fault a few hundred pages a step for reasons of its own (automatic NUMA
    # balancing's hinting faults count as minor faults: 216 a step on one CI machine)
    assert (ok, again) == ("True", "True") and int(faults) < 1000, out.stdout
    out = subprocess.run([sys.executable, "-c", _ALLOC_PROBE], env={**env, "METASAE_MALLOC": "default"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == ["False", "False"]


def test_a_pass_of_a_seed_whose_training_is_complete_trains_nothing(tmp_path, monkeypatch):
    """The harness's pass task on an output folder whose seed finished (e.g. under an earlier cut
    of the run list into passes) neither trains nor refuses: notebook 01 then loads the runs."""
    from metasae import pipeline
    from metasae.io import atomic_write_json

    ctx = pipeline.open_run("smoke", out_dir=tmp_path / "out", figures_dir=tmp_path / "fig")
    root = pipeline.ckpt_root(ctx, 0)
    root.mkdir(parents=True)
    atomic_write_json(root / "trainer.json", {"step": 1, "n_steps": 1, "complete": True, "fingerprint": "x",
                                              "runs": [], "batch_size": 1, "tokens": 1})

    def no_training(*a, **k):
        raise AssertionError("a complete seed was trained again")

    monkeypatch.setattr(pipeline, "_train", no_training)
    pipeline.train_pass(ctx, 0, 0, progress=False)
