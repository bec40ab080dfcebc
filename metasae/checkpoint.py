"""Checkpoints: safetensors weights + JSON config, resumable trainer state, SAELens export.

Layout of one trained SAE (``paths.checkpoint_dir(out, seed, run)``)::

    <run>/step00000200/cfg.json           architecture, SAE config, run spec, meta config
    <run>/step00000200/sae.safetensors    W_enc_DF, W_dec_FD, b_dec_D, threshold, since_fired_F
    <run>/step00000200/meta.safetensors   the meta SAE (joint runs)
    <run>/step00000200/state.safetensors  Adam moments and steps, generator state
    <run>/step00000200/history.json       training curves
    <run>/step00000200/checksums.json     sha256 + size of every file above (written last)
    <run>/saelens/                        cfg.json + sae_weights.safetensors (SAELens 6 JumpReLU)

The commit point of a whole fan-out is ``checkpoints/trainer.json`` (step,
completeness, configuration fingerprint): it is replaced atomically only after
every run's step folder is complete, so a kill -9 at any moment leaves the
previous consistent step loadable.  Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from metasae.config import RunSpec, SAEConfig
from metasae.io import IntegrityError, atomic_path, atomic_write_json, read_json, sha256_file, verify_file
from metasae.sae import BatchTopKSAE

FORMAT_VERSION = 1
SAE_FILE = "sae.safetensors"
META_FILE = "meta.safetensors"
STATE_FILE = "state.safetensors"
TRAINER_FILE = "trainer.json"


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
                   history: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    folder = Path(run_dir) / step_dirname(step)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    names = [SAE_FILE, STATE_FILE, "history.json", "cfg.json"]
    save_safetensors(sae_tensors(primary), folder / SAE_FILE)
    state = optimizer_tensors(primary_opt, "primary_opt")
    if meta is not None and meta_opt is not None:
        save_safetensors(sae_tensors(meta), folder / META_FILE)
        names.append(META_FILE)
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


def read_trainer(ckpt_root: Path, rebuild_hint: str = "") -> dict[str, Any] | None:
    """The fan-out's commit record, or None before the first commit."""
    p = Path(ckpt_root) / TRAINER_FILE
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


def export_saelens(sae: BatchTopKSAE, folder: Path, threshold_F: torch.Tensor | None = None,
                   metadata: dict[str, Any] | None = None) -> Path:
    """Write an SAE that ``sae_lens.SAE.load_from_disk`` loads unchanged.

    BatchTopK at inference is a JumpReLU with every threshold equal to the
    learned global threshold (or per-latent EER thresholds when given); the
    per-token standardisation is SAELens's ``normalize_activations =
    "layer_norm"`` (identical formula), b_dec is subtracted from the input
    (``apply_b_dec_to_input``) and b_enc is zero.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, d = sae.cfg.n_latents, sae.cfg.d_in
    if threshold_F is None:
        threshold_F = sae.threshold.detach().clamp_min(0).expand(n)
    tensors = {
        "W_enc": sae.W_enc_DF.detach().float().cpu().contiguous(),
        "W_dec": sae.W_dec_FD.detach().float().cpu().contiguous(),
        "b_enc": torch.zeros(n),
        "b_dec": sae.b_dec_D.detach().float().cpu().contiguous(),
        "threshold": threshold_F.detach().float().cpu().clone().contiguous(),
    }
    save_safetensors(tensors, folder / "sae_weights.safetensors")
    cfg = {
        "architecture": "jumprelu",
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if sae.cfg.input_norm == "standardize" else "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_training_version": None, **(metadata or {})},
    }
    atomic_write_json(folder / "cfg.json", cfg)
    return folder


def config_fingerprint(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
