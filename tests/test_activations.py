"""Activations: models, corpus tokenisation, nnsight harvesting, CE splice, cache."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from metasae.activations.cache import ActivationCache, build_cache
from metasae.activations.corpus import (CorpusUnavailable, ensure_corpus, main as corpus_main, split_row_ranges,
                                        tokenize_rows, valid_mask)
from metasae.activations.harvest import ce_with_splice, ce_with_splices, harvest_rows, read_resid_pre
from metasae.activations.models import MODEL_REGISTRY, gpt2_tokenizer, load_model
from metasae.config import DataConfig, ModelSpecConfig, Profile, SAEConfig, TrainConfig
from metasae.io import IntegrityError

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = ["tiny-gpt2", "tiny-gemma2", "tiny-llama"]

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In the beginning God created the heavens and the earth.",
    "Python is a programming language that lets you work quickly and integrate systems more effectively.",
    "A sparse autoencoder reconstructs activations from a few active latents. " * 2,
    "Matthew Henry wrote a concise commentary on the whole Bible.",
    "Tokens are cut into rows of fixed length, each starting with a BOS token.",
] * 4


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama")


def _padded_batch(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(5, 1000, (3, 10), generator=g)
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[1, :3] = 0  # left padding
    attn[2, :6] = 0
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.bos_token_id
    tok[attn == 0] = pad
    tok[0, 0] = tok[1, 3] = tok[2, 6] = lm.bos_token_id
    return tok, attn


def test_resid_pre_equals_hidden_states_with_left_padding(tiny):
    tok, attn = _padded_batch(tiny)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        hs = tiny.model(input_ids=tok, attention_mask=attn, position_ids=pos, output_hidden_states=True).hidden_states
    m = attn.bool()
    for layer in range(tiny.spec.n_layers):
        acts = torch.cat(list(harvest_rows(tiny, layer, tok, attn, batch_rows=2)))
        assert acts.shape == (3, 10, tiny.spec.d_model)
        torch.testing.assert_close(acts[m], hs[layer][m], rtol=1e-4, atol=1e-5)  # batch size changes GEMM order
    # the whole batch comes back, not batch row 0 (the `.output[0]` trap)
    acts = read_resid_pre(tiny, 2, tok, attn)
    assert not torch.allclose(acts[1][m[1]], acts[0][m[1]])


def test_gpt2_tokenizer_offline():
    assert gpt2_tokenizer()("Hello world")["input_ids"] == [15496, 995]


def test_smollm2_offline_finite_width_and_chat_template():
    lm = load_model("smollm2-135m", dtype="bfloat16")
    assert lm.spec.d_model == 576 and lm.model.config.hidden_size == 576
    assert lm.tokenizer.chat_template
    tok = tokenize_rows(DOCS[:3], lm.tokenizer, 16, 2, bos_token_id=lm.bos_token_id)
    acts = next(harvest_rows(lm, 16, tok, batch_rows=2))
    assert acts.shape == (2, 16, 576) and torch.isfinite(acts.float()).all()


def test_ce_splice_identity_and_zero_ablation():
    lm = load_model("smollm2-135m", dtype="float32")
    tok = tokenize_rows(DOCS, lm.tokenizer, 24, 2, bos_token_id=lm.bos_token_id)
    mask = valid_mask(tok, lm.bos_token_id)
    r = ce_with_splice(lm, 6, tok, mask, lambda x: x, batch_rows=2)
    assert r["n_tokens"] == int(mask[:, 1:].sum())
    assert abs(r["spliced_ce"] - r["clean_ce"]) < 1e-5 and r["kl_spliced"] < 1e-6
    assert r["zero_ce"] > r["clean_ce"] + 0.5 and r["kl_zero"] > 0.1
    # several splices in one call share the clean and zero forwards and agree with single calls
    half = lambda x: 0.5 * x  # noqa: E731
    both = ce_with_splices(lm, 6, tok, mask, {"id": lambda x: x, "half": half}, batch_rows=2)
    single = ce_with_splice(lm, 6, tok, mask, half, batch_rows=2)
    assert both["id"]["spliced_ce"] == pytest.approx(r["spliced_ce"], abs=1e-6)
    for k in ("clean_ce", "zero_ce", "spliced_ce", "kl_spliced", "kl_zero"):
        assert both["half"][k] == pytest.approx(single[k], abs=1e-6), k
    assert both["half"]["spliced_ce"] > both["half"]["clean_ce"]


def test_tokenize_rows_bos_and_mask():
    tk = gpt2_tokenizer()
    rows = tokenize_rows(["Hello world", "Hello"], tk, 4, None, bos_token_id=50256)
    # stream: BOS Hello world BOS Hello -> rows start with BOS; a boundary at a row start is not doubled
    assert rows.tolist() == [[50256, 15496, 995, 50256]]
    rows = tokenize_rows(["Hello world"] * 5, tk, 5, None, bos_token_id=50256)
    assert (rows[:, 0] == 50256).all()
    assert not valid_mask(rows, 50256)[:, 0].any()
    r = split_row_ranges({"train": 10, "calib": 4, "phi": 5, "autointerp": 1}, 4)
    assert r == {"train": (0, 3), "calib": (3, 4), "phi": (4, 6), "autointerp": (6, 7)}


def test_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="unknown model 'nope'.*tiny-llama"):
        load_model("nope")
    tok = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="out of range.*0..3"):
        next(harvest_rows(tiny_llama, 4, tok))
    with pytest.raises(ValueError, match="context limit of 256"):
        next(harvest_rows(tiny_llama, 0, torch.zeros(1, 300, dtype=torch.long)))
    with pytest.raises(CorpusUnavailable, match="no .txt"):
        ensure_corpus(str(tmp_path))
    prof = _profile()
    with pytest.raises(ValueError, match="corpus is empty"):
        build_cache(prof, tmp_path / "c0", progress=False, documents=["", "  "], loaded=tiny_llama)
    with pytest.raises(ValueError, match=r"yields only .* tokens .* ask for"):
        build_cache(prof, tmp_path / "c1", progress=False, documents=["tiny"], loaded=tiny_llama)


def test_corpus_cli_failure_is_one_sentence(tmp_path, capsys):
    assert corpus_main(["--ensure", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_folder_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("one document")
    assert ensure_corpus(str(tmp_path)) == tmp_path.resolve()


def test_diatheke_headings_do_not_leak_into_verses():
    """engWEB2015eb over a long range prints the last psalm title before every later indented verse."""
    from metasae.activations.corpus import _parse_diatheke

    title3, leak = "A Psalm by David, when he fled from Absalom his son.", "A praise psalm by David."
    lines = [
        "Psalms 2:12: Give sincere homage to the Son. ", "",
        title3, "  Psalms 3:1: Yahweh, how my adversaries have increased!", "Many are those who rise up against me. ",
        "", title3, "  Psalms 3:2: Many there are who say of my soul,", "God will not help him. ",
        "", leak, "  Psalms 145:1: I will exalt you, my God, the King.",
        "", leak, "  Psalms 146:1: Praise Yah!",
        "Psalms 136:1: Give thanks to Yahweh, for he is good,", "for his loving kindness endures forever. ",
        leak, "  Romans 7:1: Or don't you know, brothers?",
        leak, "  Romans 7:2: For the woman that has a husband is bound by law.",
        "(engWEB2015eb)",
    ]
    docs = dict(_parse_diatheke([ln + "\n" for ln in lines], "engWEB2015eb"))
    assert docs["Psalms 2"] == ["Give sincere homage to the Son. "]
    assert docs["Psalms 3"][0] == f"{title3}\nYahweh, how my adversaries have increased!\nMany are those who rise up against me. "
    assert docs["Psalms 3"][1] == "Many there are who say of my soul,\nGod will not help him. "
    assert docs["Psalms 145"] == [f"{leak}\nI will exalt you, my God, the King."]  # its own title, once
    assert docs["Psalms 146"] == ["Praise Yah!"]  # the repeated title is the leak
    assert docs["Psalms 136"] == ["Give thanks to Yahweh, for he is good,\nfor his loving kindness endures forever. "]
    assert docs["Romans 7"] == ["Or don't you know, brothers?", "For the woman that has a husband is bound by law."]


def test_commentary_parser_dedups_and_attributes_chapters():
    from metasae.activations.corpus import _commentary_chapters, _parse_diatheke

    intro = "Genesis is a name taken from the Greek, and signifies the book of generation."
    light = " * Verses 1-2 *    God said, Let there be light; he willed it, and at once there was light."
    noah = "The most remarkable thing concerning the old world, is the destroying of it by the deluge."
    grace = "Noah found grace in the eyes of the Lord; this distinguished him from others."
    ch6 = ["Chapter 6", "    Chapter Outline",
           f"     The wickedness of the world.(1-2)     Noah finds grace.(3)   * Verses 1-2 *    {noah}"]
    lines = [
        "Genesis 1:1: Genesis", f"   {intro}", "    Chapter Outline", "     God creates light.(1-2)",
        f"Genesis 1:2:{light}",  # the same comment printed again for the next verse of its passage
        f"Genesis 1:3:{light}",
        *[f"Genesis 6:{v}: {ln}" if i == 0 else ln for v in (1, 2) for i, ln in enumerate(ch6)],
        f"  Genesis 6:3:  * Verse 3 *. {grace}   {noah}",  # an indented prefix; a repeated paragraph
        "Genesis 6:4: ",
        "(MHCC)",
    ]
    docs = dict(_commentary_chapters(_parse_diatheke([ln + "\n" for ln in lines], "MHCC")))
    assert list(docs) == ["Genesis 1", "Genesis 6"]
    assert docs["Genesis 1"].split("\n\n") == [intro, light.split("*    ")[1]]
    assert docs["Genesis 6"].split("\n\n") == [noah, grace]
    assert not any(s in t for t in docs.values() for s in ("Verse", "Chapter", ":", "(1-2)"))


# ---------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------


def _profile(name="tinytest"):
    data = DataConfig(corpus="<test>", ctx_len=16, train_tokens=160, calib_tokens=32, phi_tokens=48,
                      autointerp_tokens=32, harvest_batch_rows=3, shard_tokens=64, cache_dtype="bfloat16")
    return Profile(name=name, model=ModelSpecConfig(name="tiny-llama", layer=2, dtype="float32"), data=data,
                   sae=SAEConfig(d_in=64, n_latents=128, k=4), train=TrainConfig(batch_size=16))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("cache")
    cache = build_cache(_profile(), out, progress=False, documents=DOCS, loaded=tiny_llama)
    return out, cache


def test_cache_round_trip_exact(built, tiny_llama):
    out, cache = built
    man = json.loads((out / "manifest.json").read_text())
    assert [man["splits"][s]["rows"] for s in ("train", "calib", "phi", "autointerp")] == [10, 2, 3, 2]
    starts = [tuple(man["splits"][s]["stream_rows"]) for s in ("train", "calib", "phi", "autointerp")]
    assert starts == [(0, 10), (10, 12), (12, 15), (15, 17)]
    assert len(man["splits"]["train"]["shards"]) == 3  # 4 rows of 16 per 64-token shard
    cache.verify()
    all_tok = tokenize_rows(DOCS, tiny_llama.tokenizer, 16, 17, bos_token_id=tiny_llama.bos_token_id)
    for split, (a, b) in zip(("train", "calib", "phi", "autointerp"), starts):
        acts, tok, mask = cache.split_arrays(split)
        assert torch.equal(tok.long(), all_tok[a:b])
        assert torch.equal(mask, valid_mask(all_tok[a:b], tiny_llama.bos_token_id))
        ref = torch.cat(list(harvest_rows(tiny_llama, 2, all_tok[a:b], batch_rows=4)))
        ref = ref.to(torch.bfloat16).float()
        assert torch.equal(acts[0:len(acts)], ref)
        assert torch.equal(acts[[1, 0]], ref[[1, 0]]) and torch.equal(acts[1], ref[1])
        assert torch.equal(acts[1, 3:9], ref[1, 3:9])  # a window of positions (autointerp contexts)
        valid = torch.cat(list(cache.valid_acts(split, chunk_tokens=7)))
        assert torch.equal(valid, ref[mask])
        assert cache.n_valid(split) == valid.shape[0]
    # rerunning is a no-op: nothing rebuilt
    mtime = (out / "acts_train_0000.bin").stat().st_mtime_ns
    build_cache(_profile(), out, progress=False, documents=DOCS, loaded=tiny_llama)
    assert (out / "acts_train_0000.bin").stat().st_mtime_ns == mtime


def test_iter_batches_deterministic_and_resumable(built):
    _, cache = built
    n = cache.n_valid("train")
    nb = cache.num_batches("train", 16, epochs=2.5)
    assert nb == int(2.5 * n) // 16
    full = list(cache.iter_batches("train", 16, seed=3, epochs=2.5))
    assert len(full) == nb and all(b.shape == (16, 64) and b.dtype == torch.float32 for b in full)
    again = list(cache.iter_batches("train", 16, seed=3, epochs=2.5))
    assert all(torch.equal(x, y) for x, y in zip(full, again))
    resumed = list(cache.iter_batches("train", 16, seed=3, epochs=2.5, start_batch=5))
    assert len(resumed) == nb - 5 and all(torch.equal(x, y) for x, y in zip(full[5:], resumed))
    other = next(cache.iter_batches("train", 16, seed=4))
    assert not torch.equal(other, full[0])
    # one epoch visits every valid position exactly once
    ep = torch.cat(list(cache.iter_batches("train", 16, seed=3, epochs=1.0, drop_last=False)))
    ref = torch.cat(list(cache.valid_acts("train")))
    assert ep.shape == ref.shape
    assert torch.equal(ep[ep[:, 0].argsort()][:, 0], ref[ref[:, 0].argsort()][:, 0])


def test_resume_rebuilds_partial_shard(built, tmp_path, tiny_llama):
    out, _ = built
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    man = json.loads((copy / "manifest.json").read_text())
    sh = man["splits"]["phi"]["shards"][0]
    sh["sha256"] = sh["size"] = None  # as if killed while writing this shard
    (copy / "manifest.json").write_text(json.dumps(man))
    (copy / sh["file"]).write_bytes(b"partial")
    cache = build_cache(_profile(), copy, progress=False, documents=DOCS, loaded=tiny_llama)
    cache.verify()
    assert (copy / sh["file"]).read_bytes() == (out / sh["file"]).read_bytes()


def test_truncated_finished_shard_is_rebuilt_with_one_line(built, tmp_path, tiny_llama, capsys):
    out, _ = built
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    sh = json.loads((copy / "manifest.json").read_text())["splits"]["train"]["shards"][1]
    data = (copy / sh["file"]).read_bytes()
    (copy / sh["file"]).write_bytes(data[:-10])  # finished in the manifest, truncated on disk
    capsys.readouterr()
    build_cache(_profile(), copy, progress=False, documents=DOCS, loaded=tiny_llama)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [f"[metasae] activation cache {copy}: {sh['file']} (train split) is truncated "
                   f"({len(data) - 10:,} of {len(data):,} bytes); re-harvesting its 64 tokens"]
    assert (copy / sh["file"]).read_bytes() == data
    (copy / sh["file"]).unlink()
    build_cache(_profile(), copy, progress=False, documents=DOCS, loaded=tiny_llama)
    assert "is missing; re-harvesting" in capsys.readouterr().err
    assert (copy / sh["file"]).read_bytes() == data


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_corrupted_shard_detected(built, tmp_path, damage):
    out, _ = built
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    p = copy / "acts_calib_0000.bin"
    data = bytearray(p.read_bytes())
    p.write_bytes(bytes(data[:-10]) if damage == "truncate" else bytes(data[:100]) + bytes([data[100] ^ 1]) + bytes(data[101:]))
    with pytest.raises(IntegrityError, match=r"acts_calib_0000\.bin.*run_all\.sh --profile tinytest"):
        ActivationCache(copy).verify()


def test_settings_mismatch_is_refused(built, tiny_llama):
    out, _ = built
    prof = _profile()
    prof = dataclasses.replace(prof, model=dataclasses.replace(prof.model, layer=1))
    with pytest.raises(IntegrityError, match="other settings \\(layer\\)"):
        build_cache(prof, out, progress=False, documents=DOCS, loaded=tiny_llama)


def test_registry_widths():
    assert MODEL_REGISTRY["gpt2-large"].d_model == 1280 and MODEL_REGISTRY["gpt2-large"].n_layers == 36
    assert MODEL_REGISTRY["gemma-2-9b"].d_model == 3584 and MODEL_REGISTRY["gemma-2-9b"].n_layers == 42
    assert MODEL_REGISTRY["smollm2-135m"].d_model == 576
    assert np.isfinite(MODEL_REGISTRY["smollm2-135m"].d_model)


def test_massive_tokens_are_left_out_of_training_batches(built):
    _, cache = built
    norms = cache.token_norms("train")
    ref = torch.cat(list(cache.valid_acts("train")))
    assert np.allclose(norms, ref.norm(dim=1).numpy(), rtol=1e-6)
    cut = float(np.quantile(norms, 0.8))  # leave out the top 20% of this tiny split
    assert cache.massive_norm(0) == float("inf")
    assert cache.massive_norm(2.0) == pytest.approx(2.0 * float(np.median(norms)))
    kept = int((norms <= cut).sum())
    assert cache.num_batches("train", 8, exclude_above=cut, drop_last=False) == -(-kept // 8)
    ep = torch.cat(list(cache.iter_batches("train", 8, seed=1, exclude_above=cut, drop_last=False)))
    assert ep.shape[0] == kept and float(ep.norm(dim=1).max()) <= cut * (1 + 1e-6)
    # without the cut the same seed gives the full split
    assert torch.cat(list(cache.iter_batches("train", 8, seed=1, drop_last=False))).shape[0] == len(norms)


def test_splice_passes_massive_tokens_through_unchanged():
    from metasae.pipeline import splice_fn
    from metasae.sae import BatchTopKSAE

    sae = BatchTopKSAE(SAEConfig(d_in=16, n_latents=32, k=2), seed=0)
    x = torch.randn(10, 16)
    x[3] *= 100.0
    cut = float(x.norm(dim=1).median()) * 5
    out = splice_fn(sae, cut)(x)
    assert torch.equal(out[3], x[3])
    rest = [i for i in range(10) if i != 3]
    assert torch.allclose(out[rest], sae.reconstruct(x)[rest])
    assert not torch.equal(splice_fn(sae)(x)[3], x[3])  # no cut: every token is spliced


def test_massive_variance_stats_in_one_pass_equal_the_dense_computation():
    import numpy as np
    import torch

    from metasae.activations.cache import massive_variance_stats

    g = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 12, generator=g) + 3.0
    X[::97] *= 40.0  # a few huge tokens
    massive = (X.norm(dim=1) > 100).numpy()
    assert 5 <= massive.sum() <= 20
    share, dims = massive_variance_stats(X.split(64), massive)
    Xc = X.double() - X.double().mean(0)
    want = float(Xc[torch.from_numpy(massive)].pow(2).sum() / Xc.pow(2).sum())
    assert share == pytest.approx(want, rel=1e-10)
    assert torch.allclose(dims, X[torch.from_numpy(massive)].pow(2).mean(0), rtol=1e-6)
    assert massive_variance_stats(X.split(64), np.zeros(1000, bool))[0] == 0.0
    with pytest.raises(ValueError, match="flags"):
        massive_variance_stats(X.split(64), massive[:-1])


def test_rechunk_regroups_rows_exactly_and_copies_only_chunks_that_span_parts():
    import random

    from metasae.activations.cache import _rechunk

    rng = random.Random(0)
    for _ in range(200):
        parts = [torch.randn(rng.randint(0, 40), 3) for _ in range(rng.randint(0, 6))]
        c = rng.randint(1, 25)
        rows = torch.cat(parts) if parts else torch.zeros(0, 3)
        got = list(_rechunk(iter(parts), c))
        want = list(torch.split(rows, c)) if rows.shape[0] else []
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    big = torch.randn(100, 3)
    first = next(_rechunk(iter([big]), 10))
    assert first.data_ptr() == big.data_ptr()  # a view, not a copy
