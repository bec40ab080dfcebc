"""Metrics (SPEC section 3): exactness against brute force and constructed cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from metasae.metrics import (
    CoFiringCounts,
    CrossCounts,
    EERCalibrator,
    Fallback,
    accumulate_counts,
    calibrate_eer_thresholds,
    ce_summary,
    cross_phi_matrix,
    delta_pct,
    fired_indices,
    firing_from_dense,
    hungarian_match,
    is_junk_token,
    load_eer_thresholds,
    merging_candidates,
    paired_seed_test,
    phi_summary,
    rebatch,
    reconstruction_metrics,
    save_eer_thresholds,
    splitting_candidates,
    topk_cross_phi,
    welch_from_summaries,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def brute_phi(F: np.ndarray) -> np.ndarray:
    Fd = F.astype(np.float64)
    T = Fd.shape[0]
    N11 = Fd.T @ Fd
    Ni = Fd.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (N11 * T - np.outer(Ni, Ni)) / np.sqrt(np.outer(Ni * (T - Ni), Ni * (T - Ni)))


def brute_pairs(F: np.ndarray) -> np.ndarray:
    phi = brute_phi(F)
    T = F.shape[0]
    Ni = F.sum(0)
    alive = (Ni > 0) & (Ni < T)
    iu = np.triu_indices(F.shape[1], 1)
    m = alive[iu[0]] & alive[iu[1]]
    return phi[iu][m]


def random_firing(rng, T, n, max_rate=0.3):
    F = rng.random((T, n)) < rng.random(n) * max_rate
    return F


def counts_of(F, chunk=64, rows=None):
    c = CoFiringCounts(F.shape[1], rows=rows)
    for s in range(0, F.shape[0], chunk):
        c.update(firing_from_dense(F[s:s + chunk]))
    return c


class ToySAE(torch.nn.Module):
    """Minimal stand-in with the BatchTopKSAE interface (input_norm 'none')."""

    def __init__(self, d, n, k, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cfg = type("Cfg", (), {"d_in": d, "n_latents": n, "k": k, "input_norm": "none"})()
        self.W_enc_DF = torch.nn.Parameter(torch.randn(d, n, generator=g) / math.sqrt(d))
        W = torch.randn(n, d, generator=g)
        self.W_dec_FD = torch.nn.Parameter(W / W.norm(dim=1, keepdim=True))
        self.b_dec_D = torch.nn.Parameter(torch.zeros(d))
        self.register_buffer("threshold", torch.tensor(0.5))

    def standardize(self, x):
        return x, torch.zeros(x.shape[0], 1), torch.ones(x.shape[0], 1)

    @torch.no_grad()
    def pre_acts(self, x):
        return torch.relu((x - self.b_dec_D) @ self.W_enc_DF)

    def batch_topk_mask(self, pre):
        flat = pre.flatten()
        idx = flat.topk(self.cfg.k * pre.shape[0]).indices
        m = torch.zeros_like(flat, dtype=torch.bool)
        m[idx] = True
        return m.view_as(pre)

    def _acts(self, x, thr):
        pre = self.pre_acts(x)
        t = self.threshold if thr is None else thr
        return pre * (pre > t)

    def reconstruct(self, x, thresholds_F=None):
        return self._acts(x, thresholds_F) @ self.W_dec_FD + self.b_dec_D

    def mse_standardized(self, x, thresholds_F=None):
        return float(((self.reconstruct(x, thresholds_F) - x) ** 2).mean())


def eer_batches(kept_vals, notkept_vals):
    """pre / kept arrays of one latent: kept values first, then not-kept ones."""
    pre = np.concatenate([kept_vals, notkept_vals]).astype(np.float32)[:, None]
    kept = np.concatenate([np.ones(kept_vals.size, bool), np.zeros(notkept_vals.size, bool)])[:, None]
    return torch.from_numpy(pre), torch.from_numpy(kept)


# ---------------------------------------------------------------------------
# phi: exact against brute force
# ---------------------------------------------------------------------------


def test_pair_counts_match_dense_product():
    rng = np.random.default_rng(0)
    F = random_firing(rng, 300, 25)
    c = counts_of(F, chunk=37)
    assert c.N == 300
    assert np.array_equal(c.dense_N11(), F.astype(np.int64).T @ F.astype(np.int64))


def test_phi_summary_exact_with_never_and_always_firing_latents():
    rng = np.random.default_rng(1)
    F = random_firing(rng, 400, 40)
    F[:, [3, 17]] = False  # never fire
    F[:, 9] = True  # fires on every token: phi undefined
    F[:5, 20] = True
    F[5:, 20] = False  # rare but alive
    vals = brute_pairs(F)
    s = phi_summary(counts_of(F), block_pairs=70)
    assert s.n_never_fired == 2 and s.n_always_fired == 1 and s.n_alive == 37
    assert s.n_pairs == vals.size == 37 * 36 // 2
    assert abs(s.mean_abs_phi - np.abs(vals).mean()) < 1e-12
    assert abs(s.mean_phi - vals.mean()) < 1e-12
    assert abs(s.sum_sq - (vals ** 2).sum()) < 1e-10
    assert abs(s.var_abs_phi - np.abs(vals).var(ddof=1)) < 1e-12
    assert s.n_negative == (vals < 0).sum() and s.n_positive == (vals > 0).sum()
    assert s.max_phi == pytest.approx(vals.max(), abs=1e-12)
    full = s.hist_signed_full
    assert full.counts.sum() + full.under + full.over == vals.size
    assert np.array_equal(full.counts, np.histogram(vals, bins=full.spec.edges)[0])


def test_row_blocks_merge_to_the_whole():
    rng = np.random.default_rng(2)
    F = random_firing(rng, 250, 30)
    whole = phi_summary(counts_of(F))
    parts = phi_summary(counts_of(F, rows=(0, 12))).merge(phi_summary(counts_of(F, rows=(12, 30))))
    assert parts.n_pairs == whole.n_pairs
    assert abs(parts.mean_abs_phi - whole.mean_abs_phi) < 1e-12
    assert abs(parts.var_abs_phi - whole.var_abs_phi) < 1e-12
    assert np.array_equal(parts.hist_abs_fine.counts, whole.hist_abs_fine.counts)


def test_counts_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    F = random_firing(rng, 100, 12)
    c = counts_of(F)
    c2 = CoFiringCounts.load(c.save(tmp_path / "c.npz"))
    assert c2.N == c.N and np.array_equal(c2.dense_N11(), c.dense_N11())


def test_summary_dict_roundtrip():
    rng = np.random.default_rng(4)
    s = phi_summary(counts_of(random_firing(rng, 120, 15)))
    from metasae.metrics import PhiSummary

    s2 = PhiSummary.from_dict(s.to_dict())
    assert s2.mean_abs_phi == s.mean_abs_phi and s2.n_pairs == s.n_pairs


def test_welch_matches_scipy_on_raw_pairs():
    rng = np.random.default_rng(5)
    Fa = random_firing(rng, 300, 20)
    Fb = random_firing(rng, 300, 24, max_rate=0.5)
    a, b = phi_summary(counts_of(Fa)), phi_summary(counts_of(Fb))
    w = welch_from_summaries(a, b)
    ref = stats.ttest_ind(np.abs(brute_pairs(Fa)), np.abs(brute_pairs(Fb)), equal_var=False)
    assert w.t == pytest.approx(ref.statistic, rel=1e-9)
    assert w.p == pytest.approx(ref.pvalue, rel=1e-7)
    ws = welch_from_summaries(a, b, signed=True)
    refs = stats.ttest_ind(brute_pairs(Fa), brute_pairs(Fb), equal_var=False)
    assert ws.t == pytest.approx(refs.statistic, rel=1e-9)


def test_paired_seed_test():
    j, s = [1.0, 2.0, 3.5], [1.5, 2.2, 3.6]
    r = paired_seed_test(j, s)
    ref = stats.ttest_rel(j, s)
    assert r.t == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue) and r.n == 3
    assert r.mean_diff == pytest.approx(np.mean(np.subtract(j, s)))
    assert math.isnan(paired_seed_test([1.0], [2.0]).t)


# ---------------------------------------------------------------------------
# cross-phi
# ---------------------------------------------------------------------------


def test_cross_phi_matches_brute_force_and_topk():
    rng = np.random.default_rng(6)
    T = 350
    Fa = random_firing(rng, T, 18)
    Fb = random_firing(rng, T, 22)
    Fa[:, 4] = False
    Fb[:, 7] = False
    cc = CrossCounts(18, 22)
    for s in range(0, T, 50):
        cc.update(firing_from_dense(Fa[s:s + 50]), firing_from_dense(Fb[s:s + 50]))
    both = np.concatenate([Fa, Fb], 1)
    ref = brute_phi(both)[:18, 18:]
    got = cross_phi_matrix(cc, dtype=np.float64)
    assert np.allclose(got, ref, atol=1e-12, equal_nan=True)
    assert np.isnan(got[4]).all() and np.isnan(got[:, 7]).all()
    tk = topk_cross_phi(cc, k=3, block_rows=5)
    key = np.where(np.isnan(ref), -np.inf, ref)
    for i in range(18):
        if i == 4:
            assert (tk.idx[i] == -1).all()
            continue
        assert np.allclose(tk.phi[i], np.sort(key[i])[::-1][:3], atol=1e-12)
    tb = topk_cross_phi(cc.transposed(), k=2)
    assert np.allclose(tb.phi[0], np.sort(np.where(np.isnan(ref[:, 0]), -np.inf, ref[:, 0]))[::-1][:2])
    # rows restricted to a block give the same rows
    cr = CrossCounts(18, 22, rows=(5, 11))
    cr.update(firing_from_dense(Fa), firing_from_dense(Fb))
    assert np.array_equal(cr.N11, cc.N11[5:11])


def test_accumulate_counts_one_pass_matches_fired_indices():
    sa, sb = ToySAE(8, 16, 2, seed=0), ToySAE(8, 12, 2, seed=1)
    rng = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 8, generator=rng) for _ in range(3)]
    out = accumulate_counts(xs, {"a": (sa, None), "b": (sb, np.full(12, 0.2, np.float32))},
                            within=["a"], cross=[("a", "b")], chunk_tokens=16)
    Fa = np.concatenate([ch.to_dense() for ch in fired_indices(sa, xs, None, chunk_tokens=7)])
    Fb = np.concatenate([(sb.pre_acts(x) > 0.2).numpy() for x in xs])
    assert out["a"].N == 120 and np.array_equal(out["a"].dense_N11(), Fa.astype(int).T @ Fa.astype(int))
    assert np.array_equal(out[("a", "b")].N11, Fa.astype(int).T @ Fb.astype(int))


# ---------------------------------------------------------------------------
# EER thresholds
# ---------------------------------------------------------------------------


def test_eer_separated_distributions_threshold_in_gap():
    rng = np.random.default_rng(7)
    cal = EERCalibrator(1, n_bins=200, max_value=10.0, min_selected=100)
    cal.update(*eer_batches(rng.uniform(3, 5, 5000), rng.uniform(0.01, 2, 5000)))
    r = cal.result()
    assert r.fallback_F[0] == Fallback.EER
    assert 2.0 < r.thresholds_F[0] < 3.0


def test_eer_overlapping_distributions_known_crossing():
    # kept ~ U[1, 5], not kept ~ U[0, 2]: FNR(t) = (t-1)/4 = FPR(t) = (2-t)/2 at t = 5/3
    rng = np.random.default_rng(8)
    cal = EERCalibrator(1, n_bins=200, max_value=10.0)
    cal.update(*eer_batches(rng.uniform(1, 5, 200_000), rng.uniform(1e-6, 2, 200_000)))
    assert abs(cal.result().thresholds_F[0] - 5 / 3) < 0.06


def test_eer_fallbacks_and_clamping():
    pre = torch.zeros(300, 4)
    kept = torch.zeros(300, 4, dtype=torch.bool)
    pre[:, 0] = torch.linspace(0.1, 6, 300)
    kept[150:, 0] = True  # well calibrated
    pre[:10, 1] = torch.tensor([4.0] * 5 + [1.0] * 5)
    kept[:5, 1] = True  # rare: 5 selections, min kept 4, max not kept 1 -> 4
    pre[:, 2] = 0.7  # positive but never kept: dead for BatchTopK
    pre[:3, 3] = 12.0
    kept[:200, 3] = True  # values above max_value: clamped and counted
    pre[3:200, 3] = 5.0
    cal = EERCalibrator(4, n_bins=200, max_value=10.0, min_selected=100)
    cal.update(pre, kept)
    with pytest.warns(UserWarning, match="clamped"):
        r = cal.result()
    assert list(r.fallback_F) == [Fallback.EER, Fallback.RARE, Fallback.DEAD, Fallback.EER]
    assert r.thresholds_F[1] == pytest.approx(4.0)
    assert math.isinf(r.thresholds_F[2])
    assert r.n_clamped_F[3] == 3 and r.n_selected_F[1] == 5 and r.n_positive_F[2] == 300
    assert not r.fires(torch.full((1, 4), 1e6))[0, 2]


def test_calibrate_rebatches_and_saves(tmp_path):
    sae = ToySAE(6, 10, 2)
    rng = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 6, generator=rng) for n in (30, 70, 45)]
    r = calibrate_eer_thresholds(sae, xs, batch_size=64, min_selected=5)
    assert r.n_tokens == 128 and r.n_dropped_tokens == 17
    assert int(r.n_selected_F.sum()) <= 2 * 128
    p = save_eer_thresholds(r, tmp_path / "thresholds.safetensors", include_hist=True)
    r2 = load_eer_thresholds(p)
    assert np.array_equal(r2.thresholds_F, r.thresholds_F) and np.array_equal(r2.fallback_F, r.fallback_F)
    assert r2.n_tokens == 128 and r2.max_value == 10.0 and np.array_equal(r2.hist_kept_FH, r.hist_kept_FH)


def test_rebatch_exact_sizes():
    xs = [torch.arange(n * 2, dtype=torch.float32).view(n, 2) for n in (3, 10, 1, 7)]
    st = {}
    out = list(rebatch(xs, 4, stats=st))
    assert [o.shape[0] for o in out] == [4] * 5 and st == {"n_tokens": 20, "n_dropped_tokens": 1}


# ---------------------------------------------------------------------------
# reconstruction and CE arithmetic
# ---------------------------------------------------------------------------


def test_reconstruction_metrics_against_direct_computation():
    sae = ToySAE(6, 12, 2)
    rng = torch.Generator().manual_seed(2)
    xs = [torch.randn(20, 6, generator=rng) for _ in range(3)]
    thr = np.full(12, 0.3, np.float32)
    thr[0] = np.inf
    m = reconstruction_metrics(sae, xs, thresholds=thr)
    x = torch.cat(xs)
    pre = sae.pre_acts(x)
    fired = pre > torch.from_numpy(thr)
    with torch.no_grad():
        xh = (pre * fired) @ sae.W_dec_FD + sae.b_dec_D
    assert m["n_tokens"] == 60 and m["l0"] == pytest.approx(fired.sum().item() / 60)
    assert m["dead"] == int((fired.sum(0) == 0).sum()) and m["dead"] >= 1
    assert m["mse"] == pytest.approx(float(((xh - x) ** 2).mean()), rel=1e-5)
    ev = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["explained_variance"] == pytest.approx(float(ev), rel=1e-5)
    assert m["mean_norm_x"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-6)
    assert np.allclose(m["firing_rates"], fired.float().mean(0).numpy())


def test_ce_summary_and_delta_pct():
    d = ce_summary({"clean_ce": 3.47, "spliced_ce": 3.557, "zero_ce": 10.0, "kl_spliced": 0.1, "kl_zero": 4.0,
                    "n_tokens": 100})
    assert d["delta_ce_pct"] == pytest.approx(100 * 0.087 / 3.47)
    assert d["ce_loss_score"] == pytest.approx((10 - 3.557) / (10 - 3.47))
    assert d["frac_ce_destroyed"] == pytest.approx(1 - d["ce_loss_score"])
    assert d["kl_div_score"] == pytest.approx(0.975)
    assert delta_pct(0.106, 0.097) == pytest.approx(100 * 0.009 / 0.097)
    assert math.isnan(delta_pct(1.0, 0.0))


# ---------------------------------------------------------------------------
# matching and splitting
# ---------------------------------------------------------------------------


def test_hungarian_recovers_permutation():
    rng = np.random.default_rng(9)
    W = rng.normal(size=(40, 16))
    perm = rng.permutation(40)
    Wb = W[perm] + 0.01 * rng.normal(size=(40, 16))
    alive_b = np.ones(40, bool)
    alive_b[0] = False
    m = hungarian_match(W, torch.from_numpy(Wb), alive_b=alive_b)
    assert m.n_matched == 40 and len(m) == 39
    assert np.array_equal(perm[m.idx_b], m.idx_a)
    assert (m.cosine > 0.99).all()


def test_splitting_ranks_a_split_latent_first():
    rng = np.random.default_rng(10)
    T = 4000
    J = rng.random((T, 12)) < 0.02  # joint latents
    S = rng.random((T, 10)) < 0.02  # solo latents, unrelated...
    S[:, 6] = J[:, 3] | J[:, 8]  # ...except 6, which fires iff joint 3 or 8 fires: a split in two
    S[:, 2] = J[:, 5]  # one-to-one: top1 high, top2 low
    S[:, 4] = J[:, 1] | J[:, 2]  # also split, but dominated by a punctuation token
    cc = CrossCounts(10, 12)
    cc.update(firing_from_dense(S), firing_from_dense(J))
    rate = S.mean(0)
    tokens = ["the"] * 10
    tokens[4] = " ,"
    frac = np.full(10, 0.2)
    frac[4] = 0.9
    recs = splitting_candidates(cc, rate, tokens, frac, k=5, min_child_phi=0.3)
    assert recs[0]["parent"] == 6
    assert sorted(c["child"] for c in recs[0]["children"]) == [3, 8]
    assert all(r["parent"] != 4 for r in recs)
    assert [r["parent"] for r in splitting_candidates(cc, rate)][:2] in ([6, 4], [4, 6])
    # dense matrix input gives the same ranking
    assert splitting_candidates(cross_phi_matrix(cc), rate, tokens, frac)[0]["parent"] == 6
    # mirror: joint 3 and 8 are not merges; a joint latent firing iff solo 0 or 1 fires would be
    merges = merging_candidates(topk_cross_phi(cc.transposed(), 5), J.mean(0))
    assert merges[0]["phi_top2"] < recs[0]["phi_top2"]


def test_junk_token_rule():
    assert is_junk_token(" ,", 0.6) and is_junk_token("a", 0.5) and is_junk_token("  ", 0.9)
    assert not is_junk_token(" ,", 0.4) and not is_junk_token(" the", 0.9) and not is_junk_token(None, None)


# ---------------------------------------------------------------------------
# with the real SAE class, when present
# ---------------------------------------------------------------------------


def test_with_real_sae_class():
    sae_mod = pytest.importorskip("metasae.sae")
    from metasae.config import SAEConfig

    sae = sae_mod.BatchTopKSAE(SAEConfig(d_in=8, n_latents=32, k=4), seed=0)
    rng = torch.Generator().manual_seed(3)
    xs = [torch.randn(50, 8, generator=rng) for _ in range(4)]
    r = calibrate_eer_thresholds(sae, xs, batch_size=64, min_selected=10)
    assert r.n_tokens == 192 and np.isfinite(r.thresholds_F[r.fallback_F != Fallback.DEAD]).all()
    m = reconstruction_metrics(sae, xs, thresholds=r)
    assert m["n_tokens"] == 200 and m["mse"] >= 0 and 0 <= m["dead"] <= 32
    c = CoFiringCounts(32).update_many(fired_indices(sae, xs, r))
    assert c.N == 200 and c.N_i.sum() == round(m["l0"] * 200)


def test_fused_reconstruction_pass_counts_cofiring_exactly():
    import torch

    from metasae.config import SAEConfig
    from metasae.metrics.cooccurrence import CoFiringCounts, accumulate_counts
    from metasae.metrics.recon import reconstruction_metrics
    from metasae.sae import BatchTopKSAE

    sae = BatchTopKSAE(SAEConfig(d_in=16, n_latents=40, k=3), seed=1)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    xs = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    counts = CoFiringCounts(40)
    rec = reconstruction_metrics(sae, xs, counts=counts)
    ref = accumulate_counts(xs, {"s": (sae, None)}, within=["s"])["s"]
    assert counts.N == ref.N == 96
    assert np.array_equal(counts.N_i, ref.N_i) and np.array_equal(counts.N11_packed, ref.N11_packed)
    assert "mse_batchtopk" in rec and rec["l0"] == pytest.approx(counts.N_i.sum() / 96)


@pytest.mark.parametrize("rows", [None, (3, 17)])
def test_dense_cofiring_counts_equal_the_sparse_ones(rows, tmp_path):
    """The GPU path (dense F^T F, packed once) gives the sparse path's integers, blocks included."""
    rng = np.random.default_rng(5)
    F = random_firing(rng, 300, 24)
    sparse = counts_of(F, chunk=64, rows=rows)
    dense = CoFiringCounts(24, rows=rows)
    old = CoFiringCounts.DENSE_BLOCK_TOKENS
    CoFiringCounts.DENSE_BLOCK_TOKENS = 50  # several blocks per chunk
    try:
        for s in range(0, 300, 64):
            dense.update_fired(torch.from_numpy(F[s:s + 64]), dense=True)
    finally:
        CoFiringCounts.DENSE_BLOCK_TOKENS = old
    assert dense.N == sparse.N and np.array_equal(dense.N_i, sparse.N_i)
    assert np.array_equal(dense.row_block(dense.lo, dense.hi)[2], sparse.row_block(sparse.lo, sparse.hi)[2])
    again = CoFiringCounts.load(dense.save(tmp_path / "d.npz"))
    assert np.array_equal(again.N11_packed, sparse.N11_packed)
    auto = CoFiringCounts(24, rows=rows)
    auto.update_fired(torch.from_numpy(F))  # a CPU tensor: the sparse path
    assert np.array_equal(auto.N11_packed, sparse.N11_packed)


def test_cross_counts_save_and_load(tmp_path):
    rng = np.random.default_rng(6)
    Fa, Fb = random_firing(rng, 120, 10), random_firing(rng, 120, 7)
    from metasae.metrics.cooccurrence import CrossCounts

    c = CrossCounts(10, 7)
    c.update(firing_from_dense(Fa), firing_from_dense(Fb))
    again = CrossCounts.load(c.save(tmp_path / "x.npz"))
    assert np.array_equal(again.N11, Fa.T.astype(np.int64) @ Fb.astype(np.int64)) and again.N == 120


def test_one_pass_for_several_saes_equals_one_pass_each():
    """reconstruction_metrics_many and calibrate_eer_thresholds_many: each SAE's result is the
    one-SAE call's on the same batches, to the bit."""
    from metasae.config import SAEConfig
    from metasae.metrics.cooccurrence import CoFiringCounts
    from metasae.metrics.recon import reconstruction_metrics, reconstruction_metrics_many
    from metasae.metrics.thresholds import calibrate_eer_thresholds, calibrate_eer_thresholds_many
    from metasae.sae import BatchTopKSAE

    saes = {f"s{i}": BatchTopKSAE(SAEConfig(d_in=16, n_latents=40 + 8 * i, k=3), seed=i) for i in range(3)}
    xs = [torch.randn(24, 16, generator=torch.Generator().manual_seed(i)) * 2 for i in range(5)]
    thr = calibrate_eer_thresholds_many({nm: (s, 4.0) for nm, s in saes.items()}, iter(xs), batch_size=16,
                                        min_selected=5)
    counts = {nm: CoFiringCounts(s.cfg.n_latents) for nm, s in saes.items()}
    many = reconstruction_metrics_many({nm: (s, thr[nm], counts[nm]) for nm, s in saes.items()}, iter(xs),
                                       max_tokens=100)
    for nm, s in saes.items():
        one_thr = calibrate_eer_thresholds(s, iter(xs), batch_size=16, max_value=4.0, min_selected=5)
        for f in ("thresholds_F", "n_selected_F", "fallback_F"):
            assert np.array_equal(getattr(one_thr, f), getattr(thr[nm], f)), (nm, f)
        assert one_thr.n_tokens == thr[nm].n_tokens == 112  # whole batches of 16 out of 120 tokens
        c1 = CoFiringCounts(s.cfg.n_latents)
        one = reconstruction_metrics(s, iter(xs), thresholds=one_thr, counts=c1, max_tokens=100)
        assert one["n_tokens"] == 100
        for k, v in one.items():
            assert np.array_equal(v, many[nm][k]) if isinstance(v, np.ndarray) else v == many[nm][k], (nm, k)
        assert np.array_equal(c1.N11_packed, counts[nm].N11_packed) and c1.N == counts[nm].N == 100


def test_phi_groups_fit_the_counts_in_half_the_memory():
    from metasae.pipeline import phi_groups

    sizes = {"a": 100, "b": 100, "c": 100, "d": 300}
    # host: 2 n^2 bytes each (20,000 for n = 100, 180,000 for n = 300); half of 100,000 holds two
    assert phi_groups(sizes, "cpu", 100_000, None) == [["a", "b"], ["c"], ["d"]]
    assert phi_groups(sizes, "cpu", None, None) == [["a", "b", "c", "d"]]  # unknown memory: one pass
    # on a GPU the dense int64 accumulator (8 n^2) counts against the GPU's memory too
    assert phi_groups(sizes, "cuda", 10 ** 9, 400_000) == [["a", "b"], ["c"], ["d"]]
    assert phi_groups(sizes, "cpu", 10 ** 9, 200_000) == [["a", "b", "c", "d"]]
