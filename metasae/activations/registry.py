"""The model registry: names, sites and sizes, importable without torch.

Profiles are validated (layer < depth, d_in = width, context length) before
any heavy import, so this module holds plain data only; loading lives in
:mod:`metasae.activations.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ModelSpec:
    """What the harvester needs to know about one model."""

    name: str
    hub_id: str
    d_model: int
    n_layers: int
    max_ctx: int
    dtype: str
    """Default dtype (the paper runs Gemma in bf16)."""
    kind: Literal["hub", "gguf-smollm2", "tiny"]
    blocks_path: str
    """Attribute path from the CausalLM to its decoder block list."""
    vocab_size: int = 0
    bos_token: str = ""
    """Token prepended to every document; empty = the tokenizer's BOS (else EOS).
    SmolLM2 uses ``<|endoftext|>``, its pretraining document separator (the
    Instruct tokenizer's BOS is the chat marker ``<|im_start|>``)."""


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "gpt2-large": ModelSpec("gpt2-large", "openai-community/gpt2-large", 1280, 36, 1024, "float32", "hub",
                            "transformer.h", 50257),
    "gemma-2-9b": ModelSpec("gemma-2-9b", "google/gemma-2-9b", 3584, 42, 8192, "bfloat16", "hub",
                            "model.layers", 256000),
    "smollm2-135m": ModelSpec("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", 576, 30, 8192, "bfloat16",
                              "gguf-smollm2", "model.layers", 49152, "<|endoftext|>"),
    "tiny-gpt2": ModelSpec("tiny-gpt2", "", 64, 4, 256, "float32", "tiny", "transformer.h", 50257),
    "tiny-gemma2": ModelSpec("tiny-gemma2", "", 64, 4, 256, "float32", "tiny", "model.layers", 49152),
    "tiny-llama": ModelSpec("tiny-llama", "", 64, 4, 256, "float32", "tiny", "model.layers", 49152),
}
