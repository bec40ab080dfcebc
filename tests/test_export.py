"""The SAELens export hooks into a model from its own metadata, with no hand-editing.

Every SAE here is small and random; every model is built from a config with
random weights (nothing downloads).  "Identical" means SAELens's ``encode`` on
the exported folder equals :meth:`BatchTopKSAE.encode` on the same input, under
the threshold rule the export chose.
"""

from __future__ import annotations

import json

import pytest
import torch

from metasae.checkpoint import (
    SAELENS_DIR,
    SAELENS_META_DIR,
    export_saelens,
    export_saelens_meta,
    saelens_export_metadata,
    saelens_hook,
    saelens_run_metadata,
)
from metasae.config import DataConfig, MetaConfig, ModelSpecConfig, Profile, RunSpec, SAEConfig, TrainConfig
from metasae.metrics.thresholds import calibrate_eer_thresholds
from metasae.sae import BatchTopKSAE
from metasae.trainer import FanOutTrainer, meta_sae_config

sae_lens = pytest.importorskip("sae_lens")

torch.set_num_threads(1)

D, N, K, LAYER, CTX, BOS = 32, 128, 4, 1, 16, 0
SAE_CFG = SAEConfig(d_in=D, n_latents=N, k=K, dead_after_tokens=256, aux_k=16)
META = MetaConfig(n_latents=12, k=2, n_primary_steps=2, n_meta_steps=2)
JOINT = RunSpec("joint_l0.3_s1", "joint", seed=2, lambda2=0.3, sigma2=1.0)


def profile(model: str = "tiny-llama", corpus: str = "fineweb") -> Profile:
    """A profile whose site is resid_pre of block LAYER (not validated: only its names matter here)."""
    return Profile(name="unit", model=ModelSpecConfig(name=model, layer=LAYER, dtype="float32"),
                   data=DataConfig(corpus=corpus, ctx_len=CTX))


def trained_looking_sae(seed: int = 1) -> BatchTopKSAE:
    """A random SAE with a nonzero b_dec and a threshold that lets about k latents fire per token."""
    sae = BatchTopKSAE(SAE_CFG, seed=seed)
    with torch.no_grad():
        sae.b_dec_D.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    sae.calibrate_threshold([torch.randn(512, D, generator=torch.Generator().manual_seed(seed + 1))])
    return sae


def export_with_metadata(sae: BatchTopKSAE, folder, **kwargs):
    metadata = {**saelens_export_metadata(profile(), BOS, 12.5, "abc123", False),
                **saelens_run_metadata(JOINT, 4096, {"threshold": float(sae.threshold)})}
    return sae_lens.SAE.load_from_disk(str(export_saelens(sae, folder, metadata, **kwargs))), metadata


def assert_encodes_identically(loaded, acts: torch.Tensor, ours: torch.Tensor) -> None:
    got = loaded.encode(acts)
    assert int((ours > 0).sum()) > 0, "nothing fires: the comparison would be vacuous"
    assert torch.equal(got > 0, ours > 0)
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# (a) metadata
# ---------------------------------------------------------------------------


def test_metadata_names_model_hook_tokens_and_run(tmp_path):
    loaded, _ = export_with_metadata(trained_looking_sae(), tmp_path / "sl")
    md = loaded.cfg.metadata
    assert md.model_name == "tiny-llama" and md.metasae_model == "tiny-llama"
    assert md.hook_name == f"blocks.{LAYER}.hook_resid_pre" and md.hook_head_index is None
    assert (md.hf_hook_module, md.hf_hook_module_io) == (f"model.layers.{LAYER}", "input")
    # every row starts with BOS (the model sees it); BOS positions were not trained on
    assert md.prepend_bos is True and md.exclude_special_tokens == [BOS] and md.sequence_separator_token == BOS
    assert md.context_size == CTX and md.disable_concat_sequences is False
    assert (md.dataset_path, md.dataset) == ("HuggingFaceFW/fineweb", "fineweb")
    assert md.massive_norm_cut == 12.5
    assert (md.run_name, md.run_kind, md.seed, md.lambda2, md.sigma2) == ("joint_l0.3_s1", "joint", 2, 0.3, 1.0)
    assert (md.profile, md.git_commit, md.git_dirty, md.training_tokens) == ("unit", "abc123", False, 4096)
    assert md.thresholds == "global" and md.sae_lens_training_version is None
    assert "layer_norm" in md.input_standardisation and loaded.cfg.normalize_activations == "layer_norm"


def test_metadata_of_a_gpt2_layout_offline_corpus_and_no_massive_cut():
    md = saelens_export_metadata(profile("gpt2-large", "debian-offline"), 50256)
    assert md["model_name"] == "openai-community/gpt2-large"
    assert md["hook_name"] == f"blocks.{LAYER}.hook_resid_pre" and md["hf_hook_module"] == f"transformer.h.{LAYER}"
    assert md["dataset_path"] == "debian-offline" and md["exclude_special_tokens"] == [50256]
    assert md["massive_norm_cut"] is None and md["git_commit"] is None
    json.dumps(md, allow_nan=False)  # strict JSON: no Infinity


def test_trainer_exports_every_run_with_the_pipeline_metadata(tmp_path):
    runs = [RunSpec("solo", seed=2), JOINT]
    shared = saelens_export_metadata(profile(), BOS, git_commit="abc123", git_dirty=True)
    x = torch.randn(6 * 64, D, generator=torch.Generator().manual_seed(0))
    FanOutTrainer(SAE_CFG, META, TrainConfig(batch_size=64, checkpoint_every_steps=3), runs, ckpt_root=tmp_path,
                  progress=False, export_metadata=shared).train(lambda s: iter(x.split(64)[s:]), 6)
    solo = sae_lens.SAE.load_from_disk(str(tmp_path / "solo" / SAELENS_DIR)).cfg.metadata
    assert (solo.run_name, solo.run_kind, solo.seed, solo.training_tokens) == ("solo", "solo", 2, 6 * 64)
    assert solo.hook_name == f"blocks.{LAYER}.hook_resid_pre" and solo.git_commit == "abc123"
    joint = sae_lens.SAE.load_from_disk(str(tmp_path / JOINT.name / SAELENS_DIR)).cfg.metadata
    assert (joint.run_kind, joint.lambda2, joint.sigma2) == ("joint", 0.3, 1.0)
    meta = sae_lens.SAE.load_from_disk(str(tmp_path / JOINT.name / SAELENS_DIR / SAELENS_META_DIR))
    assert meta.cfg.d_sae == META.n_latents and meta.cfg.metadata.run_name == JOINT.name
    assert not (tmp_path / "solo" / SAELENS_DIR / SAELENS_META_DIR).exists()
    assert sorted(p.name for p in (tmp_path / JOINT.name).iterdir()) == [SAELENS_DIR, "step00000006"]


# ---------------------------------------------------------------------------
# (b) the metadata hooks the right site of a model
# ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")
def test_hooked_sae_transformer_attaches_at_the_exported_hook_name(tmp_path):
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=CTX, d_head=8, n_heads=4, d_vocab=50,
                                     act_fn="relu", seed=0)
    model = sae_lens.HookedSAETransformer(cfg)
    sae = trained_looking_sae()
    loaded, _ = export_with_metadata(sae, tmp_path / "sl")
    tokens = torch.randint(1, 50, (3, CTX), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = BOS  # prepend_bos
    _, clean = model.run_with_cache(tokens)
    hook = loaded.cfg.metadata.hook_name
    assert hook in clean.cache_dict
    resid = clean[hook].reshape(-1, D)
    # SAELens places the SAE from the metadata alone and encodes that site as ours does
    _, spliced = model.run_with_cache_with_saes(tokens, saes=[loaded])
    assert_encodes_identically(loaded, resid, sae.encode(resid))
    torch.testing.assert_close(spliced[f"{hook}.hook_sae_acts_post"].reshape(-1, N), sae.encode(resid),
                               rtol=1e-5, atol=1e-5)


def _tiny_hf_model(registry_name: str):
    import transformers

    torch.manual_seed(0)
    if registry_name == "tiny-llama":
        cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=50,
                                       max_position_embeddings=CTX)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=50, n_positions=CTX)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("registry_name", ["tiny-llama", "tiny-gpt2"])
def test_hf_module_path_reads_resid_pre_and_encodes_identically(tmp_path, registry_name):
    model = _tiny_hf_model(registry_name)
    sae = trained_looking_sae()
    metadata = saelens_export_metadata(profile(registry_name), BOS)
    loaded = sae_lens.SAE.load_from_disk(str(export_saelens(sae, tmp_path / "sl", metadata)))
    md = loaded.cfg.metadata
    assert md.hf_hook_module_io == "input"
    seen = []

    def read_input(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    handle = model.get_submodule(md.hf_hook_module).register_forward_pre_hook(read_input, with_kwargs=True)
    tokens = torch.randint(1, 50, (3, CTX), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = BOS
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], out.hidden_states[LAYER])  # resid_pre of block LAYER
    acts = seen[0].reshape(-1, D)
    assert_encodes_identically(loaded, acts, sae.encode(acts))


# ---------------------------------------------------------------------------
# (c) per-latent EER thresholds
# ---------------------------------------------------------------------------


def test_eer_threshold_export_encodes_like_ours_under_those_thresholds(tmp_path):
    sae = trained_looking_sae()
    calib = torch.randn(2048, D, generator=torch.Generator().manual_seed(5))
    eer = calibrate_eer_thresholds(sae, [calib], batch_size=256, min_selected=1).thresholds_tensor()
    assert eer.unique().numel() > 1  # genuinely per latent
    loaded, _ = export_with_metadata(sae, tmp_path / "sl", thresholds="eer", eer_thresholds_F=eer)
    assert loaded.cfg.architecture() == "jumprelu" and loaded.cfg.metadata.thresholds == "eer"
    torch.testing.assert_close(loaded.threshold.detach(), eer)
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(6))
    ours = sae.encode(x, thresholds_F=eer)
    assert not torch.equal(ours > 0, sae.encode(x) > 0)  # not the global rule in disguise
    assert_encodes_identically(loaded, x, ours)


def test_threshold_option_is_checked(tmp_path):
    sae = trained_looking_sae()
    with pytest.raises(ValueError, match='thresholds="eer" needs eer_thresholds_F'):
        export_saelens(sae, tmp_path / "a", thresholds="eer")
    with pytest.raises(ValueError, match=r"one threshold per latent \(128\), not \(3,\)"):
        export_saelens(sae, tmp_path / "a", thresholds="eer", eer_thresholds_F=torch.zeros(3))
    with pytest.raises(ValueError, match='pass thresholds="eer"'):
        export_saelens(sae, tmp_path / "a", eer_thresholds_F=torch.zeros(N))
    with pytest.raises(ValueError, match="thresholds must be \"global\" or \"eer\", not 'topk'"):
        export_saelens(sae, tmp_path / "a", thresholds="topk")


# ---------------------------------------------------------------------------
# (d) the meta SAE
# ---------------------------------------------------------------------------


def test_meta_export_encodes_decoder_rows_like_our_meta_sae(tmp_path):
    primary = trained_looking_sae()
    meta = BatchTopKSAE(meta_sae_config(SAE_CFG, META), seed=3)
    rows = primary.W_dec_FD.detach()
    # a threshold calibrated on other rows: one set on these rows equals one of their values,
    # and which side of it that value falls on is float rounding, not the export
    meta.calibrate_threshold([BatchTopKSAE(SAE_CFG, seed=9).W_dec_FD.detach()])
    _, primary_md = export_with_metadata(primary, tmp_path / "sl")
    loaded = sae_lens.SAE.load_from_disk(str(export_saelens_meta(meta, tmp_path / "sl" / "meta", primary_md)))
    assert (loaded.cfg.d_in, loaded.cfg.d_sae) == (D, META.n_latents)
    assert_encodes_identically(loaded, rows, meta.encode(rows))
    torch.testing.assert_close(loaded.decode(loaded.encode(rows)), meta.reconstruct(rows), rtol=1e-4, atol=1e-4)
    md = loaded.cfg.metadata
    # not a model hook: its input is the primary's decoder rows
    assert md.hook_name is None and md.primary_hook_name == f"blocks.{LAYER}.hook_resid_pre"
    assert "decoder rows" in md.input
    for key in ("prepend_bos", "context_size", "hf_hook_module", "exclude_special_tokens", "threshold_calibration"):
        assert key not in md, key
    assert (md.model_name, md.run_name, md.seed, md.git_commit) == ("tiny-llama", JOINT.name, 2, "abc123")


# ---------------------------------------------------------------------------
# (e) unknown sites
# ---------------------------------------------------------------------------


def test_unknown_hook_point_is_one_clear_error():
    msg = "^hook point 'resid_mid' cannot be exported to SAELens: the supported hook points are resid_pre$"
    with pytest.raises(ValueError, match=msg):
        saelens_hook(LAYER, "model.layers", "resid_mid")
    with pytest.raises(ValueError, match=msg):
        saelens_export_metadata(profile(), BOS, hook_point="resid_mid")
    with pytest.raises(ValueError, match="model 'my-model' is not in the model registry"):
        saelens_export_metadata(profile("my-model"), BOS)
