"""Streaming the training split: a mixing buffer over harvested rows, deterministic and resumable."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from metasae.activations.cache import build_cache
from metasae.activations.models import load_model
from metasae.activations.stream import planned_batches, stream_batches
from metasae.config import DataConfig, ModelSpecConfig, Profile, SAEConfig, TrainConfig

torch.set_num_threads(1)

R, T, D = 40, 8, 3


def _rows():
    tokens = torch.arange(R * T).reshape(R, T)
    mask = torch.ones(R, T, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    return tokens, mask


def _harvest(tok: torch.Tensor) -> torch.Tensor:
    """A stand-in model: the activation of a position spells its token id (exact in bf16 below 256)."""
    t = tok.float()
    return torch.stack([t // 64, t % 64, torch.ones_like(t)], dim=-1)


def _ids(batch: torch.Tensor) -> list[int]:
    return [int(a * 64 + b) for a, b in batch[:, :2].tolist()]


def _stream(**kw):
    tokens, mask = _rows()
    args = dict(batch_size=8, seed=3, n_batches=planned_batches(int(mask.sum()), 1.0, 8), buffer_tokens=64,
                harvest_rows=4, harvest=_harvest)
    args.update(kw)
    return list(stream_batches(None, 0, tokens, mask, **args))


def test_passes_visit_every_valid_position_as_often() -> None:
    n_valid = R * (T - 1)
    batches = _stream(n_batches=3 * n_valid // 8)
    assert all(b.shape == (8, D) and b.dtype == torch.float32 for b in batches)
    ids = [i for b in batches for i in _ids(b)]
    assert all(i % T != 0 for i in ids)  # BOS positions never
    counts = np.bincount(ids, minlength=R * T)[[i for i in range(R * T) if i % T]]
    # three passes' worth of tokens: the buffer carries at most half of itself into the next pass
    assert counts.sum() == 3 * n_valid and counts.min() >= 2 and counts.max() <= 4
    # shuffled across rows: a batch mixes rows
    assert len({i // T for i in _ids(batches[0])}) > 2


def test_deterministic_resumable_and_seeded() -> None:
    a, b = _stream(), _stream()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    resumed = _stream(start_batch=7)
    assert len(resumed) == len(a) - 7 and all(torch.equal(x, y) for x, y in zip(a[7:], resumed))
    other = _stream(seed=4)
    assert not torch.equal(other[0], a[0])


def test_more_batches_than_a_pass_go_on_into_the_next_pass() -> None:
    one = R * (T - 1) // 8
    batches = _stream(n_batches=2 * one + 3)
    assert len(batches) == 2 * one + 3
    ids = [i for b in batches for i in _ids(b)]
    assert max(np.bincount(ids)) >= 2  # positions seen again in the second pass


def test_massive_positions_are_left_out() -> None:
    kept = _stream(exclude_above=20.0, n_batches=10)
    assert all(float(v.norm(dim=1).max()) <= 20.0 for v in kept)
    with pytest.raises(ValueError, match="no valid positions"):
        _stream(exclude_above=0.5, n_batches=1)


def test_ranks_harvest_their_own_rows_and_together_cover_the_split() -> None:
    """shard = (rank, world): each rank reads only its rows (every world-th one), yields its
    share of every global batch, and the ranks together visit each position as one process."""
    n_valid = R * (T - 1)
    seen: dict[int, list[int]] = {}
    for rank in (0, 1):
        harvested: list[int] = []

        def harvest(tok: torch.Tensor) -> torch.Tensor:
            harvested.extend(int(t) // T for t in tok[:, 0])
            return _harvest(tok)

        part = _stream(batch_size=4, n_batches=3 * n_valid // 8, harvest=harvest, shard=(rank, 2))
        assert len(part) == 3 * n_valid // 8 and all(b.shape == (4, D) for b in part)
        assert set(harvested) == set(range(rank, R, 2))  # never another rank's rows
        seen[rank] = [i for b in part for i in _ids(b)]
        assert {i // T % 2 for i in seen[rank]} == {rank}
        resumed = _stream(batch_size=4, n_batches=3 * n_valid // 8, start_batch=5, shard=(rank, 2))
        assert all(torch.equal(x, y) for x, y in zip(part[5:], resumed))
    counts = np.bincount(seen[0] + seen[1], minlength=R * T)[[i for i in range(R * T) if i % T]]
    # three passes: every position seen; a rank's buffer is a larger share of its (half) split, so
    # more of it crosses a pass boundary than in one process
    assert counts.sum() == 3 * n_valid and counts.min() >= 1 and counts.max() <= 5
    # world 1 is the one-process stream, unchanged
    assert all(torch.equal(x, y) for x, y in zip(_stream(), _stream(shard=(0, 1))))
    with pytest.raises(ValueError, match="rank, world"):
        _stream(shard=(2, 2))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="two batches"):
        _stream(buffer_tokens=8)
    assert planned_batches(1000, 2.5, 100, massive_frac=0.1) == math.floor(900 * 2.5) // 100


DOCS = ["The quick brown fox jumps over the lazy dog. " * 3, "In the beginning God created the heavens.",
        "Python is a programming language that lets you work quickly. " * 2,
        "Tokens are cut into rows of fixed length, each starting with a BOS token."] * 6


def _profile(stream: bool) -> Profile:
    data = DataConfig(corpus="<test>", ctx_len=16, train_tokens=160, calib_tokens=32, phi_tokens=48,
                      autointerp_tokens=32, harvest_batch_rows=3, shard_tokens=64, cache_dtype="bfloat16",
                      stream_splits=["train"] if stream else [], buffer_tokens=64)
    p = Profile(name="streamtest", model=ModelSpecConfig(name="tiny-llama", layer=2, dtype="float32"), data=data,
                sae=SAEConfig(d_in=64, n_latents=128, k=4), train=TrainConfig(batch_size=16))
    p.autointerp.window = 8
    return p


def test_streamed_split_matches_the_cached_activations(tmp_path) -> None:
    lm = load_model("tiny-llama")
    cached = build_cache(_profile(False), tmp_path / "cached", progress=False, documents=DOCS, loaded=lm)
    streamed = build_cache(_profile(True), tmp_path / "streamed", progress=False, documents=DOCS, loaded=lm)
    assert streamed.streamed("train") and not cached.streamed("train")
    assert streamed.manifest["splits"]["train"]["shards"] == []
    assert not list((tmp_path / "streamed").glob("acts_train_*"))
    assert torch.equal(streamed.tokens("train"), cached.tokens("train"))
    with pytest.raises(ValueError, match="streamed"):
        next(streamed.iter_batches("train", 16, seed=0))
    assert streamed.norm_reference_split() == "calib" and cached.norm_reference_split() == "train"
    # one pass of the stream holds the cached split's activations (bf16 values; a row's harvest may
    # differ in the last bits with the batch it is harvested in, hence the tolerance)
    tokens, mask = streamed.tokens("train"), streamed.mask("train")
    n = planned_batches(streamed.n_valid("train"), 1.0, 16)
    got = torch.cat(list(stream_batches(lm, 2, tokens, mask, batch_size=16, seed=0, n_batches=n, buffer_tokens=64,
                                        harvest_rows=3)))
    want = torch.cat(list(cached.valid_acts("train")))
    assert got.shape[0] == n * 16 <= want.shape[0]
    d = torch.cdist(got, want).min(dim=1).values
    assert float(d.max()) <= 1e-2 * float(want.norm(dim=1).median())


def test_pipeline_trains_from_the_stream(tmp_path) -> None:
    from metasae import pipeline

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"{i:03d}.txt").write_text(doc)
    p = _profile(True)
    p = dataclasses.replace(p, data=dataclasses.replace(p.data, corpus=str(corpus)),
                            train=dataclasses.replace(p.train, epochs=2.0, checkpoint_every_steps=4))
    p.grid.lambda2, p.grid.sigma2, p.grid.meta_sizes, p.grid.ortho_coefs = [0.3], [1.0], [], []
    p.grid.independent_solos, p.grid.replicate_lambda2, p.grid.replicate_sigma2 = 0, 0.3, 1.0
    p.meta.n_latents, p.meta.k = 8, 2
    p.validate()
    ctx = pipeline.RunContext(p, tmp_path / "out", tmp_path / "figs")
    trained = pipeline.train_seed(ctx, 0, progress=False)
    cache = pipeline.ensure_activations(ctx, progress=False)
    n = planned_batches(cache.n_valid("train"), 2.0, 16)
    assert set(trained) >= {"solo", "joint_l0.3_s1"}
    for run in trained.values():
        assert run.history and run.history[-1]["step"] == n


# ---------------------------------------------------------------------------
# Streamed calibration and phi splits: harvested in order, as the cache would hold them
# ---------------------------------------------------------------------------


def _profile_splits(stream_splits: list[str]) -> Profile:
    p = _profile(False)
    return dataclasses.replace(p, data=dataclasses.replace(p.data, stream_splits=stream_splits))


def test_streamed_calib_and_phi_equal_the_cached_chunks_bitwise(tmp_path) -> None:
    lm = load_model("tiny-llama")
    cached = build_cache(_profile(False), tmp_path / "cached", progress=False, documents=DOCS, loaded=lm)
    streamed = build_cache(_profile_splits(["calib", "phi"]), tmp_path / "streamed", progress=False, documents=DOCS,
                           loaded=lm)
    assert streamed.streamed("phi") and streamed.streamed("calib") and not streamed.streamed("train")
    assert not list((tmp_path / "streamed").glob("acts_phi_*")) and not list((tmp_path / "streamed").glob("acts_calib_*"))
    for split in ("calib", "phi"):
        for chunk in (5, 16, 1000):  # chunks across harvest batches and shards, and one chunk for all
            want, got = list(cached.valid_acts(split, chunk)), list(streamed.valid_acts(split, chunk))
            assert [x.shape for x in got] == [x.shape for x in want]
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (split, chunk)
    assert np.array_equal(streamed.token_norms("calib"), cached.token_norms("calib"))
    # opened without a model (not through the pipeline): one clear sentence
    from metasae.activations.cache import ActivationCache

    bare = ActivationCache(tmp_path / "streamed")
    with pytest.raises(ValueError, match="streamed .*without a model"):
        next(bare.valid_acts("phi"))
    assert torch.equal(torch.cat(list(bare.valid_acts("train"))), torch.cat(list(cached.valid_acts("train"))))


def test_stream_splits_names_splits() -> None:
    from metasae.config import ConfigError

    with pytest.raises(ConfigError, match="may only hold split names"):
        _profile_splits(["train", "test"]).data.validate()
    _profile_splits(["train", "calib", "phi", "autointerp"]).data.validate()


def test_streamed_autointerp_split_is_held_in_memory_with_the_cached_values(tmp_path) -> None:
    """Read by position, a streamed autointerp split is harvested once into memory: every way
    of indexing it gives the cached split's values, to the bit."""
    lm = load_model("tiny-llama")
    cached = build_cache(_profile(False), tmp_path / "cached", progress=False, documents=DOCS, loaded=lm)
    streamed = build_cache(_profile_splits(["autointerp"]), tmp_path / "streamed", progress=False, documents=DOCS,
                           loaded=lm)
    assert not list((tmp_path / "streamed").glob("acts_autointerp_*"))
    want, tok_c, mask_c = cached.split_arrays("autointerp")
    got, tok_s, mask_s = streamed.split_arrays("autointerp")
    assert streamed.split_arrays("autointerp")[0] is got  # harvested once per cache object
    assert got.shape == want.shape and torch.equal(tok_s, tok_c) and torch.equal(mask_s, mask_c)
    R = got.shape[0]
    assert R == 2
    for idx in (slice(0, R), slice(1, 3), 1, -1, [1, 0, 1], (1, slice(2, 9)), (torch.tensor([0, 1]), torch.tensor([3, 4]))):
        assert torch.equal(got[idx], want[idx]), idx
    assert torch.equal(torch.cat(list(streamed.valid_acts("autointerp", 7))),
                       torch.cat(list(cached.valid_acts("autointerp", 7))))


def test_evaluation_of_streamed_splits_equals_the_cached_one(tmp_path, monkeypatch) -> None:
    """Thresholds, reconstruction, |phi| and the snapshots' |phi| from harvested calibration and
    phi splits are exactly those from the cache (the training split is cached in both runs, so the
    SAEs are the same), whether the SAEs share one pass (cached run) or, with memory for one SAE's
    counts at a time, take a pass each (streamed run)."""
    from metasae import harness, pipeline
    from metasae.io import read_json

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"{i:03d}.txt").write_text(doc)
    from metasae.metrics import recon

    passes: list[list[str]] = []
    inner = recon.reconstruction_metrics_many
    monkeypatch.setattr(recon, "reconstruction_metrics_many",
                        lambda models, *a, **k: (passes.append(sorted(models)), inner(models, *a, **k))[1])
    out = {}
    for label, splits in (("cached", []), ("streamed", ["calib", "phi"])):
        p = _profile_splits(splits)
        p = dataclasses.replace(p, data=dataclasses.replace(p.data, corpus=str(corpus), ce_tokens=0),
                                train=dataclasses.replace(p.train, epochs=2.0, snapshot_fractions=[0.5]))
        p.grid.lambda2, p.grid.sigma2, p.grid.meta_sizes, p.grid.ortho_coefs = [0.3], [1.0], [], []
        p.grid.independent_solos, p.grid.replicate_lambda2, p.grid.replicate_sigma2 = 1, 0.3, 1.0
        p.meta.n_latents, p.meta.k = 8, 2
        p.validate()
        ctx = pipeline.RunContext(p, tmp_path / label, tmp_path / f"figs_{label}")
        passes.clear()
        # 2 n^2 bytes per SAE's counts (n = 128), half the memory for a group: one SAE per pass
        monkeypatch.setattr(harness, "available_memory_bytes",
                            (lambda: 2 * 2 * 128 * 128) if splits else (lambda: 10 ** 12))
        ev = pipeline.evaluate_seed(ctx, 0, progress=False)
        snaps = pipeline.snapshot_phi(ctx, 0, progress=False)
        rates = {nm: pipeline.load_firing_rates(ctx, 0, nm) for nm in ev}
        thr = {nm: read_json(pipeline.metrics_dir(ctx, 0) / nm / "phi_summary.json") for nm in ev}
        out[label] = (ev, snaps, rates, thr)
        # evaluation (3 SAEs: the lambda2 = 0 control's primary is the solo's, evaluated once) and
        # snapshots (2): one pass each cached, one pass per SAE streamed
        assert [len(g) for g in passes] == ([1] * 5 if splits else [3, 2]), passes
        assert ev["joint_l0"]["primary_of"] == "solo"
    (ev_c, sn_c, r_c, phi_c), (ev_s, sn_s, r_s, phi_s) = out["cached"], out["streamed"]
    assert sorted(ev_c) == sorted(ev_s) == ["joint_l0", "joint_l0.3_s1", "solo", "solo_indep1"]
    for nm in ev_c:
        assert ev_s[nm] == ev_c[nm], nm
        assert np.array_equal(r_s[nm], r_c[nm]) and phi_s[nm] == phi_c[nm]
    assert sn_s == sn_c and len(sn_c) == 4  # solo and the joint: one snapshot each and the end


@pytest.mark.slow
def test_streaming_on_the_smoke_profiles_model_gives_the_cached_values(tmp_path) -> None:
    """The streaming path on the smoke profile's real offline model (SmolLM2-135M, its layer and
    dtype): a streamed training split holds the cached split's activations, and streamed
    calibration and phi splits equal the cached ones bitwise."""
    from metasae.config import load_profile

    smoke = load_profile("smoke")
    lm = load_model(smoke.model.name, dtype=smoke.model.dtype)
    width = int(lm.model.config.hidden_size)

    def prof(stream_splits: list[str]) -> Profile:
        p = _profile(False)
        return dataclasses.replace(p, model=dataclasses.replace(smoke.model),
                                   data=dataclasses.replace(p.data, stream_splits=stream_splits),
                                   sae=SAEConfig(d_in=width, n_latents=2 * width, k=4))

    cached = build_cache(prof([]), tmp_path / "cached", progress=False, documents=DOCS, loaded=lm)
    streamed = build_cache(prof(["train", "calib", "phi"]), tmp_path / "streamed", progress=False,
                           documents=DOCS, loaded=lm)
    assert not [f for s in ("train", "calib", "phi") for f in (tmp_path / "streamed").glob(f"acts_{s}_*")]
    for split in ("calib", "phi"):
        want, got = list(cached.valid_acts(split, 16)), list(streamed.valid_acts(split, 16))
        assert [x.shape for x in got] == [x.shape for x in want] and got[0].shape[1] == width
        assert all(torch.equal(a, b) for a, b in zip(got, want)), split
    tokens, mask = streamed.tokens("train"), streamed.mask("train")
    n = planned_batches(streamed.n_valid("train"), 1.0, 16)
    got = torch.cat(list(stream_batches(lm, smoke.model.layer, tokens, mask, batch_size=16, seed=0, n_batches=n,
                                        buffer_tokens=64, harvest_rows=3)))
    want = torch.cat(list(cached.valid_acts("train")))
    assert got.shape[0] == n * 16 <= want.shape[0]
    # bf16 values; a row's harvest may differ in the last bits with the batch it is harvested in, so
    # each streamed row is within 2% of its norm of a cached row (another row is ~its norm away; the
    # massive activations after BOS reach norms ~10x the median, hence relative to each row)
    d = torch.cdist(got.float(), want.float()).min(dim=1).values
    assert float((d / got.float().norm(dim=1)).max()) <= 2e-2
