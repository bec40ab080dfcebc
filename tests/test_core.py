"""Invariants of the method (SPEC section 1), one test each, on small random data."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metasae.checkpoint import export_saelens, load_sae, load_trained_run, save_sae
from metasae.config import ConfigError, MetaConfig, RunSpec, SAEConfig, TrainConfig
from metasae.sae import (BatchTopKSAE, _topk_flat_indices, decomposability_penalty, decomposability_penalty_grad_,
                         meta_reconstruction, orthogonality_penalty, orthogonality_penalty_grad_, relu_)
from metasae.trainer import FanOutTrainer, RunState, TrainingError, meta_sae_config

torch.set_num_threads(1)

D, N, K, B = 24, 96, 4, 64
SAE_CFG = SAEConfig(d_in=D, n_latents=N, k=K, dead_after_tokens=4 * B, aux_k=16)
META = MetaConfig(n_latents=12, k=2, n_primary_steps=3, n_meta_steps=2)


def sparse_data(n_tokens: int, seed: int = 0, n_feat: int = 48) -> torch.Tensor:
    """Activations built from sparse combinations of fixed directions (some structure to learn)."""
    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(n_feat, D, generator=g)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_tokens, n_feat, generator=g) < 0.08
    coef = torch.rand(n_tokens, n_feat, generator=g) * 3 * mask
    return coef @ dirs + 0.05 * torch.randn(n_tokens, D, generator=g) + 2.0


def source(data: torch.Tensor, bs: int = B):
    def make(start: int):
        for i in range(start, data.shape[0] // bs):
            yield data[i * bs:(i + 1) * bs]
    return make


def dense_reference_loss(sae: BatchTopKSAE, x: torch.Tensor) -> torch.Tensor:
    """The straightforward autograd version of the SAE MSE (no AuxK)."""
    x_n, _, _ = sae.standardize(x)
    pre = torch.relu((x_n - sae.b_dec_D) @ sae.W_enc_DF)
    mask = sae.batch_topk_mask(pre.detach())
    x_hat = (pre * mask) @ sae.W_dec_FD + sae.b_dec_D
    return (x_hat - x_n).pow(2).mean()


def test_batchtopk_keeps_exactly_k_per_token_on_average():
    sae = BatchTopKSAE(SAE_CFG, seed=0)
    x = sparse_data(B)
    out = sae.forward_train(x)
    assert out.l0 == K
    mask = sae.batch_topk_mask(sae.pre_acts(x))
    assert int(mask.sum()) == K * B
    # per-token counts vary (batch-level top-k), the mean is exact
    assert mask.sum(1).float().std() > 0


def test_sparse_gradients_match_dense_autograd():
    a, b = BatchTopKSAE(SAE_CFG, seed=3), BatchTopKSAE(SAE_CFG, seed=3)
    with torch.no_grad():
        for s in (a, b):
            s.b_dec_D.normal_(generator=torch.Generator().manual_seed(5))
    x = sparse_data(B, seed=1)
    a.forward_train(x, update_stats=False).mse.backward()
    dense_reference_loss(b, x).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


def test_decoder_rows_unit_norm_after_every_step():
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), [RunSpec("j", "joint", 0, 0.3, 1.0)],
                            progress=False)
    st = trainer._fresh_state(trainer.runs[0])
    data = sparse_data(10 * B)
    for step in range(10):
        trainer._primary_step(st, data[step * B:(step + 1) * B], None, step, record=False)
        torch.testing.assert_close(st.primary.W_dec_FD.norm(dim=1), torch.ones(N), rtol=0, atol=1e-5)
        if (step + 1) % META.n_primary_steps == 0:
            trainer._meta_step(st, step, 0)
            torch.testing.assert_close(st.meta.W_dec_FD.norm(dim=1), torch.ones(META.n_latents), rtol=0, atol=1e-5)


def test_parallel_gradient_component_removed():
    sae = BatchTopKSAE(SAE_CFG, seed=0)
    sae.forward_train(sparse_data(B)).loss.backward()
    sae.remove_parallel_grad()
    radial = (sae.W_dec_FD.grad * sae.W_dec_FD).sum(1)
    assert radial.abs().max() < 1e-6


def test_no_gradient_reaches_the_meta_sae_from_the_primary_loss():
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), [RunSpec("j", "joint", 0, 1.0, 0.5)],
                            progress=False)
    st = trainer._fresh_state(trainer.runs[0])
    before = {k: v.clone() for k, v in st.meta.state_dict().items()}
    trainer._primary_step(st, sparse_data(B), None, 0, record=True)
    assert all(p.grad is None for p in st.meta.parameters())
    for k, v in st.meta.state_dict().items():
        assert torch.equal(v, before[k]), k  # the critic pass changes no meta statistic either
    assert st.history[-1]["penalty"] > 0


def test_penalty_matches_formula_on_a_hand_built_case():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    W_hat = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    sigma2 = 0.5
    mean_p, p = decomposability_penalty(W, W_hat, sigma2)
    expected = torch.tensor([1.0, torch.exp(torch.tensor(-1.0 / 0.5)), torch.exp(torch.tensor(-1.0 / 0.5))])
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(mean_p, expected.mean())


def test_penalty_gradient_pushes_rows_away_from_meta_reconstruction():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 5, generator=g).requires_grad_(True)
    W_hat = W.detach() + 0.3 * torch.randn(8, 5, generator=g)
    mean_p, _ = decomposability_penalty(W, W_hat, 1.0)
    mean_p.backward()
    W_new = W.detach() - 0.1 * W.grad
    assert ((W_new - W_hat).norm(dim=1) > (W.detach() - W_hat).norm(dim=1)).all()
    # and the gradient direction is exactly -(W - W_hat) scaled by 2 p / (n sigma2)
    err = (W.detach() - W_hat).pow(2).sum(1, keepdim=True)
    expected = -(2 / 8) * torch.exp(-err) * (W.detach() - W_hat)
    torch.testing.assert_close(W.grad, expected)


def test_solo_and_joint_start_identical_and_lambda0_trains_exactly_like_solo():
    runs = [RunSpec("solo"), RunSpec("joint", "joint", 0, 0.3, 1.0), RunSpec("ctrl", "joint", 0, 0.0, 1.0)]
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B, eval_every_steps=5), runs, progress=False)
    fresh = [trainer._fresh_state(r) for r in runs]
    for st in fresh[1:]:
        for pa, pb in zip(fresh[0].primary.parameters(), st.primary.parameters()):
            assert torch.equal(pa, pb)
    states = trainer.train(source(sparse_data(12 * B)), 12)
    solo, joint, ctrl = (s.primary for s in states)
    for pa, pb in zip(solo.parameters(), ctrl.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(solo.W_dec_FD, joint.W_dec_FD)
    assert states[2].meta is not None and states[2].history[-1]["penalty"] > 0


def _saved(folder) -> dict:
    run = load_trained_run(folder.parent, folder.name)
    out = {f"primary.{k}": v for k, v in run.sae.state_dict().items()}
    out.update({f"meta.{k}": v for k, v in run.meta.state_dict().items()} if run.meta is not None else {})
    return out


def test_the_control_shares_the_solo_primary_and_equals_a_control_trained_alone(tmp_path, monkeypatch):
    """The lambda2 = 0 control trains no primary of its own in a fan-out with its solo, and ends
    bitwise where a control trained alone (its own primary) ends: weights, meta SAE, history,
    the calibrated threshold and the saved checkpoint."""
    ctrl = RunSpec("ctrl", "joint", 0, 0.0, 1.0)
    runs = [RunSpec("solo"), RunSpec("joint", "joint", 0, 0.3, 1.0), ctrl]
    tc = TrainConfig(batch_size=B, eval_every_steps=4, checkpoint_every_steps=5)
    data, calib = sparse_data(14 * B), sparse_data(4 * B, seed=7)

    def calib_chunks():
        return iter(calib.split(B))

    alone = FanOutTrainer(SAE_CFG, META, tc, [ctrl], ckpt_root=tmp_path / "alone", progress=False)
    ref = alone.train(source(data), 14, calib=calib_chunks)[0]
    steps = []
    real = BatchTopKSAE.train_step
    monkeypatch.setattr(BatchTopKSAE, "train_step", lambda self, *a, **k: steps.append(id(self)) or real(self, *a, **k))
    fan = FanOutTrainer(SAE_CFG, META, tc, runs, ckpt_root=tmp_path / "fan", progress=False)
    states = fan.train(source(data), 14, calib=calib_chunks)
    primaries = {id(st.primary) for st in states}
    # solo and joint step their primaries; the control shares the solo's
    assert sum(i in primaries for i in steps) == 2 * 14 and len(primaries) == 2
    shared = states[2]
    assert shared.owner is states[0] and shared.primary is states[0].primary
    for k, v in ref.primary.state_dict().items():
        assert torch.equal(v, shared.primary.state_dict()[k]), k
    for k, v in ref.meta.state_dict().items():
        assert torch.equal(v, shared.meta.state_dict()[k]), k
    def untimed(h):
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]

    assert untimed(shared.history) == untimed(ref.history) and shared.calibration == ref.calibration
    a, b = _saved(tmp_path / "alone" / "ctrl"), _saved(tmp_path / "fan" / "ctrl")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dead_latents_are_counted_in_tokens_and_feed_auxk():
    cfg = dataclasses.replace(SAE_CFG, dead_after_tokens=2 * B)
    sae = BatchTopKSAE(cfg, seed=0)
    x = sparse_data(B)
    out1 = sae.forward_train(x)
    assert out1.n_dead == 0 and float(out1.aux) == 0.0
    assert (sae.since_fired_F == B).any()  # some latents did not fire in the first batch
    sae.forward_train(x)
    dead_before = int((sae.since_fired_F >= 2 * B).sum())  # silent for 2 batches = 2*B tokens
    out3 = sae.forward_train(x)
    assert out3.n_dead == dead_before > 0
    assert float(out3.aux.detach()) > 0


def test_inference_threshold_reproduces_training_sparsity():
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), [RunSpec("solo")], progress=False)
    states = trainer.train(source(sparse_data(150 * B)), 150)
    sae = states[0].primary
    fresh = sparse_data(20 * B, seed=99)
    l0 = float((sae.encode(fresh) > 0).sum(1).float().mean())
    assert abs(l0 - K) / K < 0.35, l0


def test_save_load_roundtrip_identical_outputs(tmp_path):
    sae = BatchTopKSAE(SAE_CFG, seed=2)
    with torch.no_grad():
        sae.b_dec_D.add_(0.1)
        sae.threshold.fill_(0.2)
    save_sae(sae, tmp_path / "s")
    back = load_sae(tmp_path / "s")
    x = sparse_data(B, seed=4)
    assert torch.equal(sae.reconstruct(x), back.reconstruct(x))
    assert torch.equal(sae.encode(x), back.encode(x))


def test_trained_run_loads_back(tmp_path):
    runs = [RunSpec("solo"), RunSpec("joint", "joint", 0, 0.3, 1.0)]
    states = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B, checkpoint_every_steps=4), runs,
                           ckpt_root=tmp_path, progress=False).train(source(sparse_data(9 * B)), 9)
    back = load_trained_run(tmp_path, "joint")
    assert torch.equal(back.sae.W_dec_FD, states[1].primary.W_dec_FD)
    assert torch.equal(back.meta.W_enc_DF, states[1].meta.W_enc_DF)
    assert back.history[-1]["step"] == 9
    assert sorted(p.name for p in (tmp_path / "joint").iterdir()) == ["saelens", "step00000009"]


def test_saelens_export_loads_and_encodes_identically(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = BatchTopKSAE(SAE_CFG, seed=1)
    with torch.no_grad():
        sae.b_dec_D.normal_(generator=torch.Generator().manual_seed(1))
        sae.threshold.fill_(0.3)
    export_saelens(sae, tmp_path / "sl")
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    x = sparse_data(B, seed=7)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.reconstruct(x), rtol=1e-4, atol=1e-4)


def test_meta_reconstruction_is_batchtopk_over_all_rows():
    mcfg = meta_sae_config(SAE_CFG, META)
    meta = BatchTopKSAE(mcfg, seed=0)
    W = BatchTopKSAE(SAE_CFG, seed=0).W_dec_FD.detach()
    W_hat = meta_reconstruction(meta, W)
    assert W_hat.shape == W.shape and not W_hat.requires_grad
    x_n, mu, std = meta.standardize(W)
    pre = meta.pre_acts(W)
    acts = pre * meta.batch_topk_mask(pre)
    torch.testing.assert_close(W_hat, meta.unstandardize(acts @ meta.W_dec_FD + meta.b_dec_D, mu, std))


def test_orthogonality_penalty_prefers_orthogonal_rows():
    eye = torch.eye(6)
    same = torch.ones(6, 6) / 6 ** 0.5
    assert float(orthogonality_penalty(eye)) == 0.0
    assert float(orthogonality_penalty(same)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("bad, field", [
    (dict(k=96), "sae.k"),
    (dict(k=0), "sae.k"),
    (dict(n_latents=-1), "sae.n_latents"),
    (dict(input_norm="zscore"), "sae.input_norm"),
    (dict(lr=0.0), "sae.lr"),
])
def test_bad_sae_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        BatchTopKSAE(dataclasses.replace(SAE_CFG, **bad))


@pytest.mark.parametrize("run, meta, field", [
    (RunSpec("j", "joint", 0, 0.3, 0.0), META, "sigma2"),
    (RunSpec("j", "joint", 0, -0.1, 1.0), META, "lambda2"),
    (RunSpec("j", "joint", 0, 0.3, 1.0), dataclasses.replace(META, n_latents=N), "meta.n_latents"),
    (RunSpec("j", "joint", 0, 0.3, 1.0, meta_latents=200), META, "meta_latents"),
    (RunSpec("j", "joint", 0, 0.3, 1.0), dataclasses.replace(META, k=12), "meta.k"),
])
def test_bad_run_config_names_the_field(run, meta, field):
    with pytest.raises(ConfigError, match=field):
        FanOutTrainer(SAE_CFG, meta, TrainConfig(batch_size=B), [run], progress=False)


def test_mismatched_width_and_short_batches_are_refused():
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), [RunSpec("solo")], progress=False)
    with pytest.raises(TrainingError, match="sae.d_in"):
        trainer.train(source(torch.randn(4 * B, D + 1)), 2)
    with pytest.raises(TrainingError, match="train.batch_size"):
        trainer.train(source(torch.randn(4 * B, D), bs=B // 2), 2)
    with pytest.raises(TrainingError, match="batch source ended"):
        trainer.train(source(torch.randn(2 * B, D)), 5)
    with pytest.raises(ConfigError, match="no full batch"):
        trainer.train(source(torch.randn(2 * B, D)), 0)


def test_nonfinite_loss_stops_with_stage_and_step():
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), [RunSpec("solo")], progress=False)
    data = sparse_data(4 * B)
    data[2 * B + 3, 0] = float("nan")
    with pytest.raises(TrainingError, match="step 2"):
        trainer.train(source(data), 4)


def test_device_setting_is_checked_and_auto_trains_like_cpu():
    with pytest.raises(ConfigError, match="train.device"):
        TrainConfig(device="tpu").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B, device="cuda"), [RunSpec("solo")], progress=False)
    runs = [RunSpec("joint", "joint", 0, 0.3, 1.0)]
    data = sparse_data(6 * B)
    a = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), runs, progress=False).train(source(data), 6)
    dev = "auto" if not torch.cuda.is_available() else "cpu"
    b = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B, device=dev), runs, progress=False).train(source(data), 6)
    assert torch.equal(a[0].primary.W_dec_FD, b[0].primary.W_dec_FD.cpu())


def test_evaluate_batch_matches_the_separate_inference_paths():
    sae = BatchTopKSAE(SAE_CFG, seed=4)
    with torch.no_grad():
        sae.threshold.fill_(0.5)
        sae.b_dec_D.normal_(generator=torch.Generator().manual_seed(2))
    x = sparse_data(B, seed=8)
    th = torch.rand(N, generator=torch.Generator().manual_seed(3))
    out = sae.evaluate_batch(x, th)
    # firing follows the per-latent (EER) thresholds; every reconstruction metric the global threshold
    assert torch.equal(out["fired_BF"], sae.pre_acts(x) > th)
    torch.testing.assert_close(out["x_hat_BD"], sae.reconstruct(x))
    assert int(out["l0_threshold"]) == int((sae.pre_acts(x) > 0.5).sum())
    dense = sae.encode(x) @ sae.W_dec_FD + sae.b_dec_D  # the dense GEMM the sparse decode replaces
    x_n = sae.standardize(x)[0]
    torch.testing.assert_close(out["sse_threshold"] / x.numel(), (dense - x_n).pow(2).mean(), rtol=1e-5, atol=1e-7)
    dense_eer = sae.encode(x, th) @ sae.W_dec_FD + sae.b_dec_D
    torch.testing.assert_close(out["sse_eer"] / x.numel(), (dense_eer - x_n).pow(2).mean(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(float(out["sse_batchtopk"]) / x.numel(), sae.mse_standardized(x, batch_topk=True),
                               rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# The fast fan-out: same math as the straightforward versions
# ---------------------------------------------------------------------------


def dense_aux_reference(sae: BatchTopKSAE, x: torch.Tensor, x_hat_n: torch.Tensor, dead: torch.Tensor):
    """AuxK written the straightforward way: dense autograd through ReLU(x_n W) over every latent."""
    x_n, _, _ = sae.standardize(x)
    pre = torch.relu((x_n - sae.b_dec_D) @ sae.W_enc_DF)
    masked = pre.masked_fill(~dead, 0.0)
    k_aux = min(sae.cfg.aux_k, int(dead.sum()))
    idx = torch.topk(masked.detach().masked_fill(~dead, -1.0), k_aux, dim=1).indices
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, idx, True)
    recon = (pre * keep) @ sae.W_dec_FD
    return sae.cfg.aux_coef * (recon - (x_n - x_hat_n).detach()).pow(2).mean()


@pytest.mark.parametrize("n_dead", [40, 10])  # aux_k = 16: a top-k among the dead, or every dead latent
def test_dense_auxk_gradients_match_autograd_reference(n_dead):
    a, b = BatchTopKSAE(SAE_CFG, seed=6), BatchTopKSAE(SAE_CFG, seed=6)
    with torch.no_grad():
        for s in (a, b):
            s.b_dec_D.normal_(generator=torch.Generator().manual_seed(1))
    x = sparse_data(B, seed=3)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[torch.randperm(N, generator=torch.Generator().manual_seed(0))[:n_dead]] = True
    x_n, _, _ = a.standardize(x)
    x_hat_n = 0.5 * x_n
    pre = a._pre_from_normalized(x_n)
    a._aux_loss(pre, x_n, x_hat_n, dead).backward()
    dense_aux_reference(b, x, x_hat_n, dead).backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7)


def test_orthogonality_penalty_equals_full_fp32_max_cosine():
    W1 = torch.randn(300, D, generator=torch.Generator().manual_seed(2)).requires_grad_()
    W2 = W1.detach().clone().requires_grad_()
    got = orthogonality_penalty(W1, chunk=128, generator=torch.Generator().manual_seed(9))
    # reference: the full fp32 cosine matrix of every chunk, same permutation
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(9))
    Wn = W2 / W2.norm(dim=1, keepdim=True)
    ref = W2.new_zeros(())
    for s in range(0, 300, 128):
        Wc = Wn[perm[s:s + 128]]
        cos = (Wc @ Wc.t()).masked_fill(torch.eye(len(Wc), dtype=torch.bool), -1.0)
        ref = ref + cos.max(dim=1).values.clamp_min(0).pow(2).sum()
    ref = ref / 300
    got.backward()
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(W1.grad, W2.grad, rtol=1e-5, atol=1e-7)


def test_each_run_of_a_fanout_equals_its_single_run_path():
    runs = [RunSpec("solo", "solo", 0), RunSpec("joint", "joint", 0, 0.3, 1.0), RunSpec("ortho", "ortho", 0, ortho_coef=0.1),
            RunSpec("indep", "solo", 1000)]
    data = sparse_data(14 * B)
    cfg = TrainConfig(batch_size=B, eval_every_steps=7)
    together = FanOutTrainer(SAE_CFG, META, cfg, runs, progress=False).train(source(data), 14)
    for st in together:
        alone = FanOutTrainer(SAE_CFG, META, cfg, [st.spec], progress=False).train(source(data), 14)[0]
        for pa, pb in zip(st.primary.parameters(), alone.primary.parameters()):
            assert torch.equal(pa, pb), st.spec.name
        if st.meta is not None:
            for pa, pb in zip(st.meta.parameters(), alone.meta.parameters()):
                assert torch.equal(pa, pb), st.spec.name


def test_calibrated_threshold_gives_l0_k_on_calibration_and_close_on_held_out(tmp_path):
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), [RunSpec("solo")], progress=False,
                            ckpt_root=tmp_path)
    calib = sparse_data(40 * B, seed=50)
    states = trainer.train(source(sparse_data(60 * B)), 60, calib=lambda: iter(calib.split(8 * B)))
    sae = states[0].primary
    assert states[0].calibration["threshold"] == float(sae.threshold)
    l0_calib = float((sae.encode(calib) > 0).sum()) / calib.shape[0]
    assert abs(l0_calib - K) <= 0.01 * K, l0_calib  # exact up to ties
    held = sparse_data(40 * B, seed=77)
    l0 = float((sae.encode(held) > 0).sum()) / held.shape[0]
    assert abs(l0 - K) / K <= 0.10, l0
    # the stored checkpoint and the SAELens export carry the calibrated threshold
    again = load_trained_run(tmp_path, "solo")
    assert float(again.sae.threshold) == float(sae.threshold)


def test_calibration_is_exact_when_one_chunk_holds_most_of_the_top_values():
    sae = BatchTopKSAE(SAE_CFG, seed=0)
    quiet = sparse_data(4 * B, seed=1) * 0.0 + 2.0  # constant tokens: tiny pre-activations
    loud = sparse_data(B, seed=2)
    sae.calibrate_threshold([quiet[:B], quiet[B:2 * B], loud], margin=1.0)
    allx = torch.cat([quiet[:2 * B], loud])
    pre = sae.pre_acts(allx).reshape(-1)
    kth = torch.topk(pre, K * allx.shape[0]).values.min()
    assert float(sae.threshold) == pytest.approx(max(float(kth), 0.0))


def test_snapshots_are_written_at_the_requested_steps(tmp_path):
    runs = [RunSpec("solo"), RunSpec("joint", "joint", 0, 0.3, 1.0), RunSpec("other", "solo", 5)]
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B, checkpoint_every_steps=4), runs,
                            progress=False, ckpt_root=tmp_path)
    trainer.train(source(sparse_data(12 * B)), 12, snapshot_steps=(3, 6), snapshot_runs=("solo", "joint"))
    from metasae.checkpoint import step_dirname

    for nm in ("solo", "joint"):
        got = sorted(p.name for p in (tmp_path / nm / "snapshots").iterdir())
        assert got == [step_dirname(3), step_dirname(6)]
        assert (tmp_path / nm / "snapshots" / step_dirname(6) / "sae.safetensors").is_file()
    assert not (tmp_path / "other" / "snapshots").exists()


def test_fused_adam_and_contiguous_encoder_gradient():
    trainer = FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=B), [RunSpec("solo")], progress=False)
    st = trainer._fresh_state(trainer.runs[0])
    assert st.opt.defaults.get("fused") is True
    st.primary.forward_train(sparse_data(B)).loss.backward()
    assert st.primary.W_enc_DF.grad.is_contiguous()


def test_a_completed_run_keeps_no_optimizer_state(tmp_path):
    """The final commit is never resumed: it holds weights, not Adam's moments (a third of
    the size); the intermediate commits keep them, and loading the completed run still works."""
    from safetensors.torch import load_file

    from metasae.checkpoint import STATE_FILE, read_trainer, step_dirname

    runs = [RunSpec("solo"), RunSpec("joint", "joint", 0, 0.3, 1.0)]
    cfg = TrainConfig(batch_size=B, checkpoint_every_steps=4)
    FanOutTrainer(SAE_CFG, META, cfg, runs, ckpt_root=tmp_path, progress=False).train(
        source(sparse_data(10 * B)), 10)
    assert read_trainer(tmp_path)["complete"]
    state = load_file(str(tmp_path / "joint" / step_dirname(10) / STATE_FILE))
    assert set(state) == {"step"}
    again = FanOutTrainer(SAE_CFG, META, cfg, runs, ckpt_root=tmp_path, progress=False).train(
        source(sparse_data(10 * B)), 10)
    assert again[1].meta is not None and again[0].history[-1]["step"] == 10
    # an unfinished run's commit keeps the moments it resumes from
    part = tmp_path / "part"
    data = sparse_data(10 * B)

    def stops_at_6(start: int):
        for i in range(start, 10):
            if i == 6:
                raise KeyboardInterrupt
            yield data[i * B:(i + 1) * B]

    with pytest.raises(KeyboardInterrupt):
        FanOutTrainer(SAE_CFG, META, cfg, runs, ckpt_root=part, progress=False).train(stops_at_6, 10)
    state = load_file(str(part / "joint" / step_dirname(4) / STATE_FILE))
    assert any(k.startswith("primary_opt.") for k in state) and any(k.startswith("meta_opt.") for k in state)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("n_dead", [0, 5, 40])  # aux_k = 16: no AuxK, every dead latent, a top-k among them
def test_train_step_gradient_equals_autograd_of_forward_train(autocast, n_dead):
    """The trainer's autograd-free step: same loss, same statistics updates, and the gradient
    autograd gives for forward_train (up to the order of floating-point sums)."""
    a, b = BatchTopKSAE(SAE_CFG, seed=5), BatchTopKSAE(SAE_CFG, seed=5)
    with torch.no_grad():
        for s in (a, b):
            s.b_dec_D.normal_(generator=torch.Generator().manual_seed(2))
            s.since_fired_F[torch.randperm(N, generator=torch.Generator().manual_seed(3))[:n_dead]] = 10 * B
    x = 3 * sparse_data(B, seed=4) + 1
    ref = a.forward_train(x, autocast)
    ref.loss.backward()
    got = b.train_step(x, autocast)
    assert (n_dead > 0) == bool(float(got.aux) > 0)
    torch.testing.assert_close(got.loss, ref.loss.detach(), rtol=1e-6, atol=0)
    assert float(got.l0) == float(ref.l0) and got.n_dead == ref.n_dead
    assert torch.equal(a.since_fired_F, b.since_fired_F) and torch.equal(a.threshold, b.threshold)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6 * float(pa.grad.abs().max()))


def test_decomposability_penalty_gradient_equals_autograd():
    W = torch.nn.functional.normalize(torch.randn(50, D, generator=torch.Generator().manual_seed(0)), dim=1)
    W_hat = W + 0.3 * torch.randn(50, D, generator=torch.Generator().manual_seed(1))
    leaf = W.clone().requires_grad_()
    pen, _ = decomposability_penalty(leaf, W_hat, 0.7)
    (0.3 * pen).backward()
    p = torch.nn.Parameter(W.clone())
    p.grad = torch.full_like(W, 0.5)
    got = decomposability_penalty_grad_(p, W_hat, 0.7, 0.3)
    torch.testing.assert_close(got, pen.detach())
    torch.testing.assert_close(p.grad, leaf.grad + 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_topk_selection_is_the_exact_top_with_ties_by_position(dtype):
    """_topk_flat_indices: ascending flat indices of the kk largest values, ties at the kk-th
    value kept in index order; on the sampled-threshold path, on its fallback, and on small inputs."""
    g = torch.Generator().manual_seed(0)
    for B_, n_, kk in ((512, 256, 512 * 8), (16, 64, 40), (512, 256, 512 * 200)):
        # few distinct values: many ties at the threshold
        pre = torch.randint(0, 40, (B_, n_), generator=g).to(dtype) / 8
        pre[:, :3] = 0  # zeros, and (bf16) negative zeros after the ReLU
        flat = pre.reshape(-1).float()
        got = _topk_flat_indices(pre, kk)
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:kk]
        assert got.tolist() == sorted(order)
    # a sample whose threshold keeps fewer than kk candidates falls back to the exact answer
    pre = torch.zeros(512, 256, dtype=dtype)
    pre[::4] = 1.0  # every sampled row is all ones: the sampled threshold (1.0) admits only these rows
    got = _topk_flat_indices(pre, 512 * 100)
    assert got.numel() == 512 * 100 and torch.equal(got, torch.sort(got).values)
    assert int((pre.reshape(-1)[got] == 1).sum()) == 128 * 256


def test_bf16_relu_by_bit_pattern_equals_relu():
    x = torch.tensor([-3.0, -0.0, 0.0, 1e-30, 2.5, -1e-30, float("inf"), -float("inf")]).to(torch.bfloat16)
    got = relu_(x.clone())
    assert torch.equal(got, torch.relu(x)) and not torch.signbit(got).any()


@pytest.mark.parametrize("n_rows,chunk", [(300, 128), (200, 4096)])  # random chunks; one chunk in row order
def test_orthogonality_penalty_gradient_equals_autograd(n_rows, chunk):
    W0 = 1.3 * torch.nn.functional.normalize(torch.randn(n_rows, D, generator=torch.Generator().manual_seed(4)), dim=1)
    leaf = W0.clone().requires_grad_()
    ref = orthogonality_penalty(leaf, chunk=chunk, generator=torch.Generator().manual_seed(8))
    (0.3 * ref).backward()
    p = torch.nn.Parameter(W0.clone())
    p.grad = torch.zeros_like(W0)
    gen = torch.Generator().manual_seed(8)
    got = orthogonality_penalty_grad_(p, 0.3, chunk=chunk, generator=gen)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(p.grad, leaf.grad, rtol=1e-5, atol=1e-6 * float(leaf.grad.abs().max()))
