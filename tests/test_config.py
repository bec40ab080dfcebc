"""Configuration validation: every bad profile is refused before any work starts.

Each refusal is a :class:`ConfigError` whose message is one sentence naming the
offending field.  A property-based test checks that random sizes either
validate or raise ConfigError (never another exception), and that validation
accepts exactly the documented relations.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shipped import shipped_profiles

from metasae.config import ConfigError, available_profiles, load_profile, parse_seeds, profile_from_dict


def base() -> dict:
    """A small valid profile on the registry's smollm2-135m (576 wide, 30 layers)."""
    return {
        "name": "cfgtest",
        "seeds": [0, 1],
        "model": {"name": "smollm2-135m", "layer": 4, "dtype": "bfloat16"},
        "data": {"corpus": "debian-offline", "ctx_len": 64, "train_tokens": 4096, "calib_tokens": 512,
                 "phi_tokens": 512, "autointerp_tokens": 512, "ce_tokens": 128},
        "sae": {"n_latents": 256, "k": 8},
        "meta": {"n_latents": 24, "k": 4},
        "train": {"batch_size": 256},
        "grid": {"lambda2": [0.3], "sigma2": [1.0], "meta_sizes": [12], "ortho_coefs": [0.1]},
        "autointerp": {"window": 16},
        "synthetic": {"num_features": 64, "hidden_dim": 16, "n_latents": 64, "k": 4, "meta_latents": 8,
                      "meta_k": 2, "train_tokens": 4096, "eval_tokens": 1024, "batch_size": 256},
    }


def with_(changes: dict) -> dict:
    """base() with dotted-key changes; the value DELETE removes the key."""
    raw = copy.deepcopy(base())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


DELETE = object()

# (id, changes, text the message must contain: the field, and where useful the relation)
BAD = [
    ("k>=n", {"sae.k": 256}, "sae.k (256) must be smaller than sae.n_latents (256)"),
    ("k=0", {"sae.k": 0}, "sae.k must be a positive integer"),
    ("m>=n", {"meta.n_latents": 256}, "meta.n_latents (256) must be smaller than the primary's sae.n_latents"),
    ("meta k>=m", {"meta.k": 24}, "meta.k (24) must be smaller than meta.n_latents (24)"),
    ("sigma2=0", {"grid.sigma2": [0.0]}, "grid.sigma2 must be a positive number"),
    ("sigma2<0", {"grid.sigma2": [1.0, -3.0]}, "grid.sigma2 must be a positive number"),
    ("ablation sigma2=0", {"grid.ablation_sigma2": 0.0}, "grid.ablation_sigma2 must be a positive number"),
    ("lambda2<0", {"grid.lambda2": [-0.1]}, "grid.lambda2 must be a non-negative number"),
    ("lambda2 nan", {"grid.lambda2": [math.nan]}, "grid.lambda2 must be a non-negative number"),
    ("empty grid", {"grid.lambda2": []}, "grid.lambda2 must list at least one value"),
    ("duplicate grid runs", {"grid.lambda2": [0.3, 0.3]}, "duplicate run names"),
    ("meta size >= n", {"grid.meta_sizes": [300]}, "grid.meta_sizes value 300 must be smaller than sae.n_latents"),
    ("meta size <= meta k", {"grid.meta_sizes": [4]}, "grid.meta_sizes value 4 must be larger than meta.k (4)"),
    ("batch 0", {"train.batch_size": 0}, "train.batch_size must be a positive integer"),
    ("train tokens < batch", {"data.train_tokens": 100}, "data.train_tokens (100) must be at least train.batch_size (256)"),
    ("synthetic batch", {"synthetic.train_tokens": 100}, "synthetic.train_tokens (100) must be at least synthetic.batch_size"),
    ("ce > phi", {"data.ce_tokens": 1024}, "data.ce_tokens (1024) must not exceed data.phi_tokens (512)"),
    ("phi 0", {"data.phi_tokens": 0, "data.ce_tokens": 0}, "data.phi_tokens must be a positive integer"),
    ("unknown section", {"bogus": {"a": 1}}, "unknown setting 'bogus'"),
    ("unknown key", {"sae.nlatents": 10}, "unknown setting sae.nlatents"),
    ("section not a table", {"sae": 5}, "section [sae] must be a table"),
    ("k as string", {"sae.k": "8"}, "sae.k must be an integer"),
    ("k as float", {"sae.k": 8.0}, "sae.k must be an integer"),
    ("k as bool", {"sae.k": True}, "sae.k must be an integer"),
    ("lr as string", {"sae.lr": "3e-4"}, "sae.lr must be a number"),
    ("lr = 0", {"sae.lr": 0.0}, "sae.lr must be a positive number"),
    ("lr inf", {"sae.lr": math.inf}, "sae.lr must be a positive number"),
    ("beta2 = 1", {"sae.beta2": 1.0}, "sae.beta2 must be in [0, 1)"),
    ("lambda2 list type", {"grid.lambda2": 0.3}, "grid.lambda2 must be a list"),
    ("bad dtype", {"model.dtype": "float64"}, "model.dtype must be float32, bfloat16 or float16"),
    ("bad cache dtype", {"data.cache_dtype": "float32"}, "data.cache_dtype must be float16 or bfloat16"),
    ("bad autocast", {"train.autocast": "fp16"}, "train.autocast must be 'bfloat16' or 'none'"),
    ("bad input_norm", {"sae.input_norm": "layernorm"}, "sae.input_norm must be 'standardize' or 'none'"),
    ("trust_remote_code string", {"model.trust_remote_code": "yes"}, "model.trust_remote_code must be true or false"),
    ("empty seeds", {"seeds": []}, "seeds must list at least one seed"),
    ("repeated seeds", {"seeds": [0, 1, 0]}, "seeds must not repeat a seed"),
    ("negative seed", {"seeds": [-1]}, "seeds must be a non-negative integer"),
    ("seeds not a list", {"seeds": "0,1"}, "seeds must be a list of non-negative integers"),
    ("bad backend", {"autointerp.backend": "vllm"}, "autointerp.backend must be 'hf-local' or 'openai'"),
    ("openai without url", {"autointerp.backend": "openai", "autointerp.model": "qwen"},
     "autointerp.base_url is required when autointerp.backend is 'openai'"),
    ("bad scorer", {"autointerp.scorers": ["simulation", "fuzzy"]}, "autointerp.scorers has unknown scorer 'fuzzy'"),
    ("window > ctx", {"autointerp.window": 65}, "autointerp.window (65) must not exceed data.ctx_len (64)"),
    ("layer >= depth", {"model.layer": 40},
     "model.layer (40) must be smaller than the number of layers of smollm2-135m (30)"),
    ("layer = depth", {"model.layer": 30},
     "model.layer (30) must be smaller than the number of layers of smollm2-135m (30)"),
    ("negative layer", {"model.layer": -1}, "model.layer must be a non-negative integer"),
    ("d_in mismatch", {"sae.d_in": 512}, "sae.d_in (512) must equal the width of smollm2-135m (576)"),
    ("ctx beyond model", {"model.name": "tiny-gpt2", "model.layer": 2, "data.ctx_len": 512},
     "data.ctx_len (512) must not exceed the context length of tiny-gpt2 (256)"),
    ("synthetic meta_k", {"synthetic.meta_k": 8}, "synthetic.meta_k (8) must be smaller than synthetic.meta_latents"),
    ("empty name", {"name": ""}, "name must be a non-empty string"),
    ("name escapes outputs", {"name": "../elsewhere"}, "name must be a folder-safe string"),
    ("hidden name", {"name": ".x"}, "name must be a folder-safe string"),
]


@pytest.mark.parametrize("changes, needle", [(c, n) for _, c, n in BAD], ids=[i for i, _, _ in BAD])
def test_bad_profile_is_refused_with_one_sentence_naming_the_field(changes, needle):
    with pytest.raises(ConfigError) as exc:
        profile_from_dict(with_(changes))
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg and msg.count(". ") == 0, f"not one sentence: {msg!r}"


def test_base_profile_is_valid_and_fills_d_in_from_the_registry():
    p = profile_from_dict(base())
    assert p.sae.d_in == 576
    assert p.model.trust_remote_code is False  # off unless a profile sets it


@pytest.mark.parametrize("name", shipped_profiles())
def test_shipped_profiles_validate(name):
    p = load_profile(name)
    assert p.name == name
    assert p.model.trust_remote_code is False


def test_at_least_the_documented_profiles_ship():
    assert {"smoke", "default", "gpt2-large", "gemma-2-9b"} <= set(available_profiles())


# ---------------------------------------------------------------------------
# load_profile: files, names, TOML errors, seed overrides
# ---------------------------------------------------------------------------


def _toml(raw: dict) -> str:
    lines = []
    for key, value in raw.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in raw.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def test_toml_file_round_trip_and_seed_override(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(_toml(base()))
    assert load_profile(path).seeds == [0, 1]
    assert load_profile(path, seeds=[5, 7]).seeds == [5, 7]
    with pytest.raises(ConfigError, match="seeds must not repeat"):
        load_profile(path, seeds=[5, 5])


def test_json_file_loads(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(base()))
    assert load_profile(path).name == "cfgtest"


def test_bad_value_in_toml_file_names_the_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(_toml(with_({"meta.n_latents": 300})))
    with pytest.raises(ConfigError, match=r"meta\.n_latents \(300\)"):
        load_profile(path)


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "x"\n[sae\nk = 3\n')
    with pytest.raises(ConfigError) as exc:
        load_profile(path)
    assert str(path) in str(exc.value) and "not valid TOML" in str(exc.value)


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_profile(path)


def test_missing_profile_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")


def test_unknown_profile_name_lists_available_ones():
    with pytest.raises(ConfigError) as exc:
        load_profile("no-such-profile")
    msg = str(exc.value)
    assert "'no-such-profile'" in msg and "available" in msg
    for name in available_profiles():
        assert name in msg


def test_profile_must_be_a_table():
    with pytest.raises(ConfigError, match="table"):
        profile_from_dict([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# --seeds strings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, seeds", [("0", [0]), ("0,1,2", [0, 1, 2]), (" 3 , 1 ", [3, 1]), ("10,2", [10, 2])])
def test_parse_seeds_good(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", ",", "0,,1", "a", "1.5", "-1", "0;1", "0 1", "1,1", "²", "0,٣", "0x1"])
def test_parse_seeds_bad_names_the_flag(text):
    with pytest.raises(ConfigError) as exc:
        parse_seeds(text)
    assert "--seeds" in str(exc.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_parse_seeds_never_raises_anything_else(text):
    try:
        seeds = parse_seeds(text)
    except ConfigError:
        return
    assert seeds and len(set(seeds)) == len(seeds) and all(s >= 0 for s in seeds)
    assert parse_seeds(",".join(map(str, seeds))) == seeds


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=6, unique=True))
def test_parse_seeds_round_trip(seeds):
    assert parse_seeds(",".join(map(str, seeds))) == seeds


# ---------------------------------------------------------------------------
# Property-based: sizes validate exactly when the documented relations hold
# ---------------------------------------------------------------------------

@st.composite
def sizes(draw):
    """Sizes near the boundaries of every relation (most draws valid, many just off)."""
    n = draw(st.integers(-1, 40))
    k = draw(st.integers(-1, n + 1))
    m = draw(st.integers(-1, n + 1))
    mk = draw(st.integers(-1, m + 1))
    meta_sizes = draw(st.lists(st.integers(mk - 1, n + 1), max_size=2))
    batch = draw(st.integers(-1, 40))
    train = draw(st.integers(batch - 2, batch + 40))
    phi = draw(st.integers(-1, 40))
    ce = draw(st.integers(-1, phi + 2))
    layer = draw(st.integers(-1, 32))
    return n, k, m, mk, meta_sizes, batch, train, phi, ce, layer


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes())
def test_sizes_validate_exactly_when_relations_hold(values):
    n, k, m, mk, sizes, batch, train, phi, ce, layer = values
    raw = with_({"sae.n_latents": n, "sae.k": k, "meta.n_latents": m, "meta.k": mk, "grid.meta_sizes": sizes,
                 "train.batch_size": batch, "data.train_tokens": train, "data.phi_tokens": phi,
                 "data.ce_tokens": ce, "model.layer": layer, "autointerp.window": 1})
    others = [s for s in sizes if s != m]
    expected = (
        0 < k < n
        and 0 < mk < m < n
        and all(mk < s < n for s in sizes)
        and len(set(others)) == len(others)  # a repeated size would duplicate a run (m itself is skipped)
        and 0 < batch <= train
        and 0 <= ce <= phi and phi > 0
        and 0 <= layer < 30
    )
    try:
        profile_from_dict(raw)
        ok = True
    except ConfigError:
        ok = False
    assert ok == expected


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
known_keys = [(sec, key) for sec, body in base().items() if isinstance(body, dict) for key in body] + [
    ("sae", "lr"), ("sae", "beta1"), ("sae", "input_norm"), ("sae", "aux_k"), ("model", "trust_remote_code"),
    ("autointerp", "backend"), ("autointerp", "scorers"), ("autointerp", "base_url"), ("train", "threads"),
    ("grid", "control_lambda0"), ("grid", "independent_solos"), ("synthetic", "seeds"), ("synthetic", "extra"),
    ("data", "cache_dtype"), ("data", "shard_tokens"), ("model", "hub_id"),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(known_keys), json_values), min_size=1, max_size=3),
       st.sampled_from([None, "name", "seeds", "description"]), json_values)
def test_arbitrary_values_raise_only_config_error(changes, top_key, top_value):
    raw = with_({f"{sec}.{key}": v for (sec, key), v in changes})
    if top_key:
        raw[top_key] = top_value
    try:
        p = profile_from_dict(raw)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    p.to_json()  # whatever validates is serialisable as the run's saved config


def test_resolved_profile_round_trips_through_its_saved_json():
    p = profile_from_dict(base())
    again = profile_from_dict(json.loads(p.to_json()))
    assert again == p


def test_every_shipped_profile_file_validates():
    from metasae.config import PROFILE_DIR

    for name in shipped_profiles():
        load_profile(Path(PROFILE_DIR) / f"{name}.toml")


def test_profiles_validate_without_torch():
    """run_all.sh checks the profile with whatever Python exists before setup (no torch there yet):
    validation, including the registry's model widths and depths, must not import torch."""
    import subprocess
    import sys

    code = ("import sys; from metasae.config import load_profile; "
            "[load_profile(p) for p in ('smoke', 'default', 'gpt2-large', 'gemma-2-9b')]; "
            "assert load_profile('default').sae.d_in == 576; "
            "assert 'torch' not in sys.modules, 'profile validation imported torch'")
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_replication_seeds_train_only_what_the_headline_needs():
    raw = with_({"seeds": [0, 1, 2], "grid.full_seeds": 1, "grid.lambda2": [0.1, 0.3], "grid.sigma2": [1.0, 3.0]})
    prof = profile_from_dict(raw)
    full = [r.name for r in prof.runs_for_seed(0)]
    rep = [r.name for r in prof.runs_for_seed(2)]
    assert prof.replicated_run == "joint_l0.3_s1" and prof.is_full_seed(0) and not prof.is_full_seed(1)
    assert {"joint_l0.1_s1", "joint_l0.3_s3", "meta_m12", "ortho_c0.1"} <= set(full)
    assert rep == ["solo", "joint_l0.3_s1", "joint_l0", "solo_indep1"]
    # the replicated runs are the same specs (names, seeds) as on a full seed
    assert [r for r in prof.runs_for_seed(2) if r.name == "joint_l0.3_s1"][0].seed == 2
    every = profile_from_dict(with_({"grid.full_seeds": 0}))
    assert [r.name for r in every.runs_for_seed(1)] == [r.name for r in every.runs_for_seed(0)]


def test_replicated_configuration_must_be_in_the_grid():
    with pytest.raises(ConfigError, match="grid.replicate_lambda2 / replicate_sigma2"):
        profile_from_dict(with_({"grid.replicate_lambda2": 1.0}))


def test_profile_that_does_not_fit_in_memory_is_refused_naming_the_setting():
    from metasae.harness import HarnessError, check_memory

    prof = profile_from_dict(base())
    need = prof.train_memory_bytes()
    check_memory(prof, jobs=1, available=need + 1)
    with pytest.raises(HarnessError, match="sae.n_latents = 256") as exc:
        check_memory(prof, jobs=2, available=need + 1)  # two seeds at once need twice as much
    assert "--jobs 1" in str(exc.value)


def test_seeds_too_large_for_the_generators_are_refused_up_front():
    from metasae.config import MAX_SEED, parse_seeds

    assert parse_seeds(f"0,{MAX_SEED}") == [0, MAX_SEED]
    for text in ("99999999999999999999", str(MAX_SEED + 1)):
        with pytest.raises(ConfigError, match="at most") as exc:
            parse_seeds(text)
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="at most"):
        profile_from_dict(with_({"seeds": [2**40]}))
    # the largest seed and everything derived from it fit numpy's and torch's generators
    import numpy as np
    import torch

    for derived in (MAX_SEED + 1000 * 3, MAX_SEED + 7919, MAX_SEED + 104729):
        np.random.default_rng(derived)
        np.random.seed(derived)
        torch.Generator().manual_seed(derived)


def test_a_stray_profile_beside_the_shipped_ones_is_not_the_suites_business():
    """A user's draft profiles/*.toml (even an invalid one) must not change what the tests check."""
    from metasae.config import PROFILE_DIR

    stray = Path(PROFILE_DIR) / "zz_stray_draft_for_the_test.toml"
    before = shipped_profiles()
    stray.write_text('name = "zz_stray_draft_for_the_test"\n')  # invalid: no model, no data
    try:
        assert shipped_profiles() == before and "zz_stray_draft_for_the_test" not in before
    finally:
        stray.unlink()


def test_a_smoke_run_in_the_tree_leaves_it_clean():
    """figures/smoke/ (written by an in-tree smoke run) is ignored by git; figures/default/ is tracked."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    ignored = subprocess.run(["git", "check-ignore", "-q", "figures/smoke/fig1a_phi_density_diff_seed0.png"],
                             cwd=root, timeout=60)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "figures/default/fig1a_phi_density_diff_seed0.png"],
                          cwd=root, timeout=60).returncode == 1
