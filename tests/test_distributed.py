"""Data parallelism: two Gloo processes under torchrun against one process with the same
global batches, a resumed distributed run, and torchrun's world settings checked."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from metasae.distributed import DistContext, DistributedError, world_from_env

ROOT = Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from safetensors.torch import save_file
    from metasae import distributed
    from metasae.config import MetaConfig, RunSpec, SAEConfig, TrainConfig
    from metasae.trainer import FanOutTrainer

    out_dir, n_steps, stop_at, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    D, N, K, B = 16, 64, 4, 32
    sae = SAEConfig(d_in=D, n_latents=N, k=K, dead_after_tokens=3 * B, aux_k=16)
    meta = MetaConfig(n_latents=12, k=2, n_primary_steps=3, n_meta_steps=2)
    runs = [RunSpec("solo"), RunSpec("joint", "joint", 0, 0.3, 1.0), RunSpec("ortho", "ortho", 0, ortho_coef=0.1)]
    dist = distributed.init("cpu")
    tr = FanOutTrainer(sae, meta, TrainConfig(batch_size=B, eval_every_steps=2, checkpoint_every_steps=4, threads=1,
                                   autocast="none"),
                       runs, ckpt_root=ckpt or None, progress=False, dist=dist)
    g = torch.Generator().manual_seed(5)
    data = torch.randn(max(n_steps, 1) * B, D, generator=g) * torch.rand(D, generator=g) * 3

    def batches(start):
        for t in range(start, n_steps):
            if t == stop_at:
                raise KeyboardInterrupt  # a kill after the last commit
            x = data[t * B:(t + 1) * B]
            yield dist.shard(x) if dist is not None else x

    rank = dist.rank if dist is not None else 0
    if n_steps == 0:  # one forward/backward of a fresh solo SAE with a few dead latents: the gradients
        from metasae.sae import BatchTopKSAE

        m = BatchTopKSAE(sae, seed=0)
        m.dist = dist
        m.since_fired_F[:8] = 10 * B  # dead: AuxK takes part
        x = data_g = torch.randn(B, D, generator=torch.Generator().manual_seed(9)) * 2
        out = m.forward_train(dist.shard(x) if dist is not None else x)
        out.loss.backward()
        grads = [p.grad for p in m.parameters()]
        if dist is not None:
            dist.all_reduce_mean_(grads)
        save_file({n: p.grad.contiguous() for n, p in m.named_parameters()}
                  | {"since_fired_F": m.since_fired_F.float(), "threshold": m.threshold.reshape(1)},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
        sys.exit(0)
    try:
        states = tr.train(batches, n_steps)
    except KeyboardInterrupt:
        sys.exit(3)
    tensors = {}
    for st in states:
        for k, v in st.primary.state_dict().items():
            tensors[f"{st.spec.name}.{k}"] = v.detach().float().contiguous()
        if st.meta is not None:
            for k, v in st.meta.state_dict().items():
                tensors[f"{st.spec.name}.meta.{k}"] = v.detach().float().contiguous()
    for st in states:
        tensors[f"{st.spec.name}.mse"] = torch.tensor([h["mse"] for h in st.history])
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
''')


def _run(tmp: Path, name: str, nproc: int, n_steps: int = 12, stop_at: int = -1, ckpt: str = "") -> int:
    out = tmp / name
    out.mkdir(exist_ok=True)
    script = tmp / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = [str(out), str(n_steps), str(stop_at), ckpt]
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(script), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if (res.returncode != 0) != (stop_at >= 0):  # a kill: the worker exits 3 (torchrun then reports 1)
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.returncode


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_two_gloo_processes_give_the_gradient_of_the_global_batch(tmp_path):
    """One step: BatchTopK over the global batch, AuxK, dead counters and averaged gradients
    equal one process's on the whole batch, up to float summation order."""
    _run(tmp_path, "one", 1, n_steps=0)
    _run(tmp_path, "two", 2, n_steps=0)
    one = _load(tmp_path / "one" / "rank0.safetensors")
    r0, r1 = _load(tmp_path / "two" / "rank0.safetensors"), _load(tmp_path / "two" / "rank1.safetensors")
    for k in one:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the ranks"
        if k in ("since_fired_F", "threshold"):
            assert torch.equal(r0[k], one[k]), k
        else:
            torch.testing.assert_close(r0[k], one[k], rtol=1e-5, atol=1e-7)
    assert one["W_enc_DF"].abs().sum() > 0 and (one["since_fired_F"][:8] == 0).sum() < 8


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_with_the_global_batch(tmp_path):
    """12 steps of solo, joint and ortho SAEs in fp32: the ranks hold identical weights, equal to
    one process's on the same global batches up to float summation order; the dead-latent
    counters, the threshold EMA and the (global) loss history match."""
    _run(tmp_path, "one", 1)
    _run(tmp_path, "two", 2)
    one = _load(tmp_path / "one" / "rank0.safetensors")
    r0, r1 = _load(tmp_path / "two" / "rank0.safetensors"), _load(tmp_path / "two" / "rank1.safetensors")
    assert set(one) == set(r0) == set(r1)
    for k in one:
        assert torch.equal(r0[k], r1[k]), f"{k} differs between the ranks"
        if k.endswith(("since_fired_F", "threshold")):
            assert torch.equal(r0[k], one[k]), k
        else:
            torch.testing.assert_close(r0[k], one[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert len(one["solo.mse"]) == 6


@pytest.mark.slow
def test_a_resumed_distributed_run_continues_where_it_stopped(tmp_path):
    ck = str(tmp_path / "ckpt")
    assert _run(tmp_path, "whole", 2, ckpt=str(tmp_path / "ckpt_whole")) == 0
    assert _run(tmp_path, "cut", 2, stop_at=9, ckpt=ck) != 0  # killed after the step-8 commit
    assert (tmp_path / "ckpt" / "trainer.json").is_file()
    assert _run(tmp_path, "cut", 2, ckpt=ck) == 0
    whole, resumed = _load(tmp_path / "whole" / "rank0.safetensors"), _load(tmp_path / "cut" / "rank0.safetensors")
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), f"{k}: the resumed run differs"


def test_world_settings_are_checked(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() is None
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="only one of them"):
        world_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="RANK=2 is not a rank of WORLD_SIZE=2"):
        world_from_env()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(DistributedError, match="does not divide WORLD_SIZE=2"):
        world_from_env()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_from_env() == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="not a whole number"):
        world_from_env()


def test_shard_and_batch_size_must_split():
    d = DistContext(rank=1, world_size=2, backend="gloo")
    x = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(d.shard(x), x[2:])
    with pytest.raises(DistributedError, match="does not split over 2 ranks"):
        d.shard(torch.zeros(3, 2))
    from metasae.config import ConfigError, MetaConfig, RunSpec, SAEConfig, TrainConfig
    from metasae.trainer import FanOutTrainer

    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        FanOutTrainer(SAEConfig(d_in=4, n_latents=8, k=2), MetaConfig(n_latents=4, k=1), TrainConfig(batch_size=5),
                      [RunSpec("solo")], progress=False, dist=d)


PIPELINE_WORKER = textwrap.dedent('''
    import dataclasses, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, sys.argv[3])
    from test_stream import DOCS, _profile
    from metasae import distributed, pipeline

    tmp, nproc = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    corpus = tmp / "corpus"
    p = _profile(sys.argv[4] == "stream")
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, corpus=str(corpus)),
                            train=dataclasses.replace(p.train, epochs=2.0, checkpoint_every_steps=4, autocast="none",
                                                      threads=1))
    p.grid.lambda2, p.grid.sigma2, p.grid.meta_sizes, p.grid.ortho_coefs = [0.3], [1.0], [], []
    p.grid.independent_solos, p.grid.replicate_lambda2, p.grid.replicate_sigma2 = 0, 0.3, 1.0
    p.meta.n_latents, p.meta.k = 8, 2
    p.validate()
    dist = distributed.init("cpu")
    ctx = pipeline.RunContext(p, tmp / f"out{nproc}{sys.argv[4]}", tmp / "figs")
    trained = pipeline.train_seed(ctx, 0, progress=False, dist=dist)
    rank = dist.rank if dist is not None else 0
    save_file({f"{n}.{k}": v.detach().float().contiguous() for n, r in trained.items()
               for k, v in r.sae.state_dict().items()},
              str(tmp / f"pipe{nproc}{sys.argv[4]}_rank{rank}.safetensors"))
    steps = {n: r.history[-1]["step"] for n, r in trained.items()}
    (tmp / f"steps{nproc}{sys.argv[4]}_rank{rank}.txt").write_text(repr(sorted(steps.items())))
''')


@pytest.mark.slow
def test_pipeline_trains_a_seed_data_parallel(tmp_path):
    """train_seed under torchrun: rank 0 builds the cache, both train; the weights equal the
    one-process run on the same cache (fp32), and the checkpoints are where run_all.sh looks."""
    from test_stream import DOCS

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"{i:03d}.txt").write_text(doc)
    script = tmp_path / "pipe.py"
    script.write_text(PIPELINE_WORKER)
    for nproc in (1, 2):
        _run_pipeline_worker(tmp_path, script, nproc, "cache")
    one = _load(tmp_path / "pipe1cache_rank0.safetensors")
    r0, r1 = _load(tmp_path / "pipe2cache_rank0.safetensors"), _load(tmp_path / "pipe2cache_rank1.safetensors")
    assert set(one) == set(r0) and any(k.startswith("joint") for k in one)
    for k in one:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], one[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert list((tmp_path / "out2cache").rglob("trainer.json"))
    # a streamed training split: each rank harvests its own rows (metasae.activations.stream), so the
    # global batches differ from one process's; promised: the same SAEs, the same number of steps,
    # weights equal on every rank
    for nproc in (1, 2):
        _run_pipeline_worker(tmp_path, script, nproc, "stream")
    one = _load(tmp_path / "pipe1stream_rank0.safetensors")
    r0, r1 = _load(tmp_path / "pipe2stream_rank0.safetensors"), _load(tmp_path / "pipe2stream_rank1.safetensors")
    assert set(one) == set(r0)
    assert all(torch.equal(r0[k], r1[k]) and bool(torch.isfinite(r0[k]).all()) for k in r0)
    steps = {(n, r): (tmp_path / f"steps{n}stream_rank{r}.txt").read_text() for n, r in ((1, 0), (2, 0), (2, 1))}
    assert len(set(steps.values())) == 1, steps


def _run_pipeline_worker(tmp_path: Path, script: Path, nproc: int, mode: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tests_dir = str(Path(__file__).resolve().parent)
    cmd = ([sys.executable, str(script)] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)])
    res = subprocess.run([*cmd, str(tmp_path), str(nproc), tests_dir, mode], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_train_dist_outside_torchrun_is_one_sentence(monkeypatch, capsys):
    from metasae import train_dist

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert train_dist.main(["--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: run this under torchrun")
