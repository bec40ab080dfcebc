"""Ground-truth atomicity benchmark on sae_lens.synthetic activations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metasae import synthetic as S
from metasae.config import ConfigError, SyntheticConfig
from metasae.sae import BatchTopKSAE


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**kw) -> SyntheticConfig:
    base = dict(num_features=256, hidden_dim=64, n_latents=256, k=8, meta_latents=24, meta_k=4,
                train_tokens=30 * 256, eval_tokens=2048, batch_size=256, lambda2=[0.3, 1.0], sigma2=[1.0],
                seeds=[0], lr=3e-3, extra={"hierarchy_roots": 8, "correlation_rank": 4})
    base.update(kw)
    return SyntheticConfig(**base)


def test_generator_is_deterministic_for_a_seed():
    cfg = tiny()
    a = S.SyntheticBatchSource(S.build_synthetic_model(cfg, 3), 3, 128)
    b = S.SyntheticBatchSource(S.build_synthetic_model(cfg, 3), 3, 128)
    torch.manual_seed(123)  # the global RNG state must not matter
    xa, fa = a.batch_with_features(5)
    torch.manual_seed(999)
    xb, fb = b.batch_with_features(5)
    assert torch.equal(xa, xb) and torch.equal(fa, fb)
    assert torch.equal(a.model.feature_dict.feature_vectors, b.model.feature_dict.feature_vectors)
    # another seed is another world; another index or stream is another batch
    c = S.build_synthetic_model(cfg, 4)
    assert not torch.equal(c.feature_dict.feature_vectors, a.model.feature_dict.feature_vectors)
    assert not torch.equal(a.batch(5), a.batch(6))
    assert not torch.equal(a.batch(5), a.batch(5, "eval"))


def test_batch_source_resumes_exactly():
    cfg = tiny()
    src = S.SyntheticBatchSource(S.build_synthetic_model(cfg, 0), 0, 64)
    it = src(0)
    first = [next(it) for _ in range(4)]
    resumed = src(2)
    assert torch.equal(next(resumed), first[2]) and torch.equal(next(resumed), first[3])
    assert first[0].shape == (64, 64) and first[0].dtype == torch.float32


def test_world_has_the_requested_structure():
    cfg = tiny()
    model = S.build_synthetic_model(cfg, 0)
    assert model.hierarchy is not None and len(model.hierarchy.roots) == 8
    assert any(r.mutually_exclusive_children for r in model.hierarchy.roots)
    assert model.correlation_matrix is not None
    p = model.activation_generator.firing_probabilities
    assert p.shape == (256,) and float(p[0]) > float(p[-1])  # Zipfian: a common head, a rare tail


def test_unknown_generator_option_is_refused():
    with pytest.raises(ConfigError, match="extra"):
        tiny(extra={"hierachy_roots": 3}).validate()


def test_true_dictionary_scores_near_perfectly_and_a_random_sae_poorly():
    # little superposition, so a transpose encoder reads the features out cleanly
    cfg = tiny(num_features=64, hidden_dim=64, n_latents=64,
               extra={"hierarchy_roots": 4, "correlation_rank": 4, "orthogonalize_steps": 100,
                      "magnitude_std": 0.1})
    model = S.build_synthetic_model(cfg, 0)
    src = S.SyntheticBatchSource(model, 0, 512)
    oracle = S.evaluate_sae(S.sae_from_dictionary(model, cfg.k), src, 2048)
    assert oracle["mcc"] > 0.999 and oracle["uniqueness"] == 1.0
    assert oracle["mixing_frac"] == 0.0 and oracle["frac_recovered"] == 1.0
    assert oracle["f1"] > 0.9 and oracle["explained_variance"] > 0.9
    rand = S.evaluate_sae(BatchTopKSAE(S.benchmark_configs(cfg)[0], seed=1), src, 2048)
    assert rand["mcc"] < 0.6 and rand["f1"] < 0.5 and rand["frac_recovered"] == 0.0
    assert rand["mixing_frac"] > oracle["mixing_frac"]


def test_mixing_counts_blended_rows_only():
    g = torch.Generator().manual_seed(0)
    W_true = torch.linalg.qr(torch.randn(32, 32, generator=g))[0][:16]  # orthonormal true directions
    blend = (W_true[0] + W_true[1]) / math.sqrt(2)
    leak = 0.95 * W_true[2] + 0.31 * W_true[3]
    W = torch.stack([W_true[4], blend, leak, W_true[5]])
    out = S.decoder_mixing(W, W_true)
    assert out["mixing_frac"] == pytest.approx(0.25)  # only the 50/50 blend mixes
    assert out["frac_recovered"] == pytest.approx(3 / 16)  # 4, 5 and (at cos 0.95) 2


def test_mean_abs_phi_matches_the_dense_formula():
    rng = np.random.default_rng(0)
    A = rng.random((300, 12)) < rng.uniform(0.02, 0.4, size=12)
    A[:, 5] = False  # a latent that never fires is excluded
    A[:, 7] = A[:, 3] | (rng.random(300) < 0.05)  # a strongly co-firing pair
    r, c = np.nonzero(A)
    got, n_alive = S.mean_abs_phi(r, c, 300, 12)
    keep = [j for j in range(12) if j != 5]
    phis = [abs(np.corrcoef(A[:, i], A[:, j])[0, 1]) for a, i in enumerate(keep) for j in keep[a + 1:]]
    assert n_alive == 11
    assert got == pytest.approx(float(np.mean(phis)), rel=1e-9)
    # the project's sparse co-firing counts give the same number
    from metasae.metrics.cooccurrence import CoFiringCounts, firing_from_dense, phi_summary

    counts = CoFiringCounts(12)
    counts.update(firing_from_dense(A[:150]))
    counts.update(firing_from_dense(A[150:]))
    assert phi_summary(counts).mean_abs_phi == pytest.approx(got, rel=1e-9)


def test_our_metrics_agree_with_sae_lens_eval_on_the_exported_sae(tmp_path):
    from sae_lens import SAE
    from sae_lens.synthetic import eval_sae_on_synthetic_data
    from sae_lens.util import temporary_seed

    from metasae.checkpoint import export_saelens

    cfg = tiny()
    model = S.build_synthetic_model(cfg, 0)
    sae = BatchTopKSAE(S.benchmark_configs(cfg)[0], seed=0)
    sae.threshold.fill_(0.3)
    src = S.SyntheticBatchSource(model, 0, 512)
    ours = S.evaluate_sae(sae, src, 512)
    loaded = SAE.load_from_disk(str(export_saelens(sae, tmp_path / "saelens")))
    with temporary_seed(S.batch_seed(0, "eval", 0)):
        ref = eval_sae_on_synthetic_data(loaded, model.feature_dict, model.activation_generator, num_samples=512)
    assert ours["mcc"] == pytest.approx(ref.mcc, abs=1e-6)
    assert ours["l0"] == pytest.approx(ref.sae_l0, rel=1e-3)
    assert ours["f1"] == pytest.approx(ref.classification.f1_score, abs=1e-3)
    assert ours["explained_variance"] == pytest.approx(ref.explained_variance, abs=1e-3)


def test_smoke_benchmark_end_to_end_and_resumes(tmp_path):
    cfg = tiny()
    res = S.run_synthetic_benchmark(cfg, tmp_path, progress=False)
    runs = res["seeds"]["0"]["runs"]
    assert set(runs) == {"solo", "joint_l0.3_s1", "joint_l1_s1", "joint_l0"}
    for r in runs.values():
        for m in ("mcc", "f1", "mixing_frac", "mean_abs_phi"):
            assert math.isfinite(r[m])
    # the lambda2 = 0 control trains the same primary as the solo run
    assert runs["joint_l0"]["mcc"] == pytest.approx(runs["solo"]["mcc"], abs=1e-6)
    assert (tmp_path / "seed0" / "synthetic" / "results.json").is_file()
    text = S.verdict(res)
    assert "joint SAE" in text and "MCC" in text and "|phi|" in text and "one seed" in text
    rows = S.summary_rows(res)
    assert [r["run"] for r in rows][-1] == "true_dictionary" and rows[0]["n"] == 1
    tests = S.paired_tests(res)
    assert {t["metric"] for t in tests} == set(S.HIGHER_IS_MORE_ATOMIC)
    # a finished seed is read back, not recomputed
    again = S.run_synthetic_benchmark(cfg, tmp_path, progress=False)
    assert again["seeds"]["0"]["seconds"] == res["seeds"]["0"]["seconds"]


def _fake_results(diffs: dict[str, list[float]], n_seeds: int) -> dict:
    seeds = {}
    for s in range(n_seeds):
        base = {"mcc": 0.5, "f1": 0.4, "mixing_frac": 0.3, "mean_abs_phi": 0.02}
        solo = {**base, "role": "solo", "lambda2": 0.0, "sigma2": 1.0}
        joint = {m: base[m] + diffs[m][s] for m in base}
        joint.update(role="grid", lambda2=0.3, sigma2=1.0)
        seeds[str(s)] = {"runs": {"solo": solo, "joint_l0.3_s1": joint}, "true_dictionary": base}
    return {"config": {}, "seeds": seeds}


def test_verdict_is_computed_from_the_numbers():
    better = _fake_results({"mcc": [0.05, 0.06, 0.055], "f1": [0.04, 0.05, 0.045],
                            "mixing_frac": [-0.1, -0.12, -0.11], "mean_abs_phi": [-0.002, -0.003, -0.0025]}, 3)
    v = S.verdict(better)
    assert "more atomic" in v and "3 seeds" in v and "1/1" in v
    worse = _fake_results({"mcc": [-0.05, -0.06, -0.055], "f1": [-0.04, -0.05, -0.045],
                           "mixing_frac": [0.1, 0.12, 0.11], "mean_abs_phi": [-0.002, -0.003, -0.0025]}, 3)
    v = S.verdict(worse)
    assert "less atomic" in v and "not evidence of atomicity" in v
