"""Configuration: one typed object per run, validated before any work starts.

A *profile* (``profiles/<name>.toml``) fixes everything an experiment needs:
the model and site, the corpus and its disjoint token splits, the primary SAE,
the meta SAE and schedule, the (lambda2, sigma2) grid, the baselines and
ablations, the autointerp backend and the synthetic benchmark.  Every run saves
its resolved profile (``Profile.to_dict``) next to its outputs.

Validation raises :class:`ConfigError` whose message is one sentence naming
the offending field, e.g. ``"sae.k (4608) must be smaller than
sae.n_latents (4608)"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


STREAMABLE_SPLITS = ("train", "calib", "phi", "autointerp")
"""Splits ``data.stream_splits`` may name: all of them."""


@dataclass
class SAEConfig:
    """A BatchTopK SAE (SPEC section 1).  Used for the primary and the meta SAE."""

    d_in: int = 0
    """Input width (d for the primary, d for the meta too: it reads decoder rows)."""
    n_latents: int = 0
    """Dictionary size (n for the primary, m for the meta)."""
    k: int = 0
    """Mean active latents per input: BatchTopK keeps k * batch entries."""
    input_norm: Literal["standardize", "none"] = "standardize"
    """Per-input standardisation (x - mean) / (std + 1e-5) over the d dims."""
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.99
    aux_k: int = 512
    """Dead latents used by the AuxK loss (top aux_k dead pre-activations)."""
    aux_coef: float = 1.0 / 32.0
    dead_after_tokens: int = 20480
    """A latent is dead after this many inputs (tokens, or decoder rows for the
    meta SAE) without firing.  The paper's code uses 5 batches of 4096."""
    threshold_lr: float = 0.01
    """EMA rate of the global inference threshold (smallest kept activation)."""

    def validate(self, where: str = "sae") -> None:
        _pos_int(self.d_in, f"{where}.d_in")
        _pos_int(self.n_latents, f"{where}.n_latents")
        _pos_int(self.k, f"{where}.k")
        if self.k >= self.n_latents:
            raise ConfigError(f"{where}.k ({self.k}) must be smaller than {where}.n_latents ({self.n_latents})")
        if self.input_norm not in ("standardize", "none"):
            raise ConfigError(f"{where}.input_norm must be 'standardize' or 'none', not {self.input_norm!r}")
        _pos_float(self.lr, f"{where}.lr")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"{where}.{name} must be in [0, 1), not {v!r}")
        _nonneg_int(self.aux_k, f"{where}.aux_k")
        _nonneg_float(self.aux_coef, f"{where}.aux_coef")
        _pos_int(self.dead_after_tokens, f"{where}.dead_after_tokens")
        if not isinstance(self.threshold_lr, (int, float)) or not 0.0 < self.threshold_lr <= 1.0:
            raise ConfigError(f"{where}.threshold_lr must be in (0, 1], not {self.threshold_lr!r}")


@dataclass
class MetaConfig:
    """The meta SAE and the alternating schedule (SPEC section 1)."""

    n_latents: int = 0
    """m, about 9% of the primary's n in the paper (1800 for 20480)."""
    k: int = 8
    n_primary_steps: int = 10
    """n_p: primary steps per macro-step (meta frozen, penalty recomputed each step)."""
    n_meta_steps: int = 5
    """n_m: meta steps per macro-step, each on the whole detached W_dec."""
    dead_after_rows: int = 0
    """Meta dead-latent window in decoder rows seen; 0 means 5 meta steps."""

    def validate(self, n_primary: int, where: str = "meta") -> None:
        _pos_int(self.n_latents, f"{where}.n_latents")
        _pos_int(self.k, f"{where}.k")
        if self.k >= self.n_latents:
            raise ConfigError(f"{where}.k ({self.k}) must be smaller than {where}.n_latents ({self.n_latents})")
        if self.n_latents >= n_primary:
            raise ConfigError(
                f"{where}.n_latents ({self.n_latents}) must be smaller than the primary's sae.n_latents ({n_primary})"
            )
        _pos_int(self.n_primary_steps, f"{where}.n_primary_steps")
        _pos_int(self.n_meta_steps, f"{where}.n_meta_steps")
        _nonneg_int(self.dead_after_rows, f"{where}.dead_after_rows")


@dataclass
class RunSpec:
    """One SAE trained from the shared activation stream.

    ``kind``:
      * ``solo``: the BatchTopK SAE alone (the paper's baseline);
      * ``joint``: primary + meta SAE + decomposability penalty lambda2 * mean(p);
        lambda2 = 0 is the "joint architecture, no penalty" control;
      * ``ortho``: OrtSAE-style baseline, penalising squared pairwise decoder
        cosine (coefficient ``ortho_coef``), no meta SAE.
    """

    name: str
    kind: Literal["solo", "joint", "ortho"] = "solo"
    seed: int = 0
    lambda2: float = 0.0
    sigma2: float = 1.0
    meta_latents: int = 0
    """Overrides meta.n_latents for this run (meta-size ablation); 0 = profile's."""
    ortho_coef: float = 0.0
    tags: dict[str, Any] = field(default_factory=dict)
    """Free-form labels for the notebooks (e.g. {"role": "grid"})."""

    def validate(self, where: str = "run") -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"{where}.name must be a non-empty folder-safe string, not {self.name!r}")
        if self.kind not in ("solo", "joint", "ortho"):
            raise ConfigError(f"{where}.kind must be 'solo', 'joint' or 'ortho', not {self.kind!r}")
        _nonneg_int(self.seed, f"{where}.seed")
        _nonneg_float(self.lambda2, f"{where}.lambda2")
        _pos_float(self.sigma2, f"{where}.sigma2")
        _nonneg_int(self.meta_latents, f"{where}.meta_latents")
        _nonneg_float(self.ortho_coef, f"{where}.ortho_coef")


def primary_owner(run: RunSpec, runs: list[RunSpec]) -> RunSpec | None:
    """The run whose primary SAE `run` shares, or None.

    A joint run with lambda2 = 0 (the control) never feeds the penalty into its primary, so its
    primary is trained exactly as the solo run of the same seed (same initialisation, same
    batches, same loss): bitwise the same weights.  The fan-out trainer therefore trains that
    primary once and the control adds only its meta SAE, trained on the shared rows
    (:class:`~metasae.trainer.FanOutTrainer`).  The owner is the first solo run of the same seed
    listed before `run`."""
    if run.kind != "joint" or run.lambda2 != 0:
        return None
    for r in runs:
        if r is run or r.name == run.name:
            return None
        if r.kind == "solo" and r.seed == run.seed:
            return r
    return None


@dataclass
class ModelSpecConfig:
    name: str = "smollm2-135m"
    """Key of the model registry (metasae.activations.models)."""
    layer: int = 16
    """resid_pre of block `layer` = HF hidden_states[layer]."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    hub_id: str = ""
    """Optional override of the registry's hub id / local path."""
    trust_remote_code: bool = False

    def validate(self, where: str = "model") -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{where}.name must be a non-empty string")
        _nonneg_int(self.layer, f"{where}.layer")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}.dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ConfigError(f"{where}.trust_remote_code must be true or false")


@dataclass
class DataConfig:
    corpus: str = "debian-offline"
    """'debian-offline' (built from Debian packages), 'fineweb' (hub), or a path
    to a local text dataset folder."""
    ctx_len: int = 128
    train_tokens: int = 0
    calib_tokens: int = 0
    """EER threshold calibration split."""
    phi_tokens: int = 0
    """|phi| / co-occurrence / reconstruction evaluation split."""
    autointerp_tokens: int = 0
    ce_tokens: int = 0
    """Tokens (taken from the start of the phi split) for CE with the SAE spliced in."""
    harvest_batch_rows: int = 16
    shard_tokens: int = 65536
    cache_dtype: Literal["float16", "bfloat16"] = "bfloat16"
    massive_norm_ratio: float = 0.0
    """Massive activations: tokens whose activation norm exceeds this multiple of the
    training split's median norm (the calibration split's when the training split is
    streamed) are left out of SAE training and passed through unchanged when an SAE is
    spliced into the model (CE is also reported with every token spliced).  0 = no
    special treatment."""
    stream_splits: list[str] = field(default_factory=list)
    """Splits harvested from the model when they are read instead of cached on disk: their token
    ids stay in the cache, their activations do not.  ``train`` goes through a mixing buffer
    while training (metasae.activations.stream); ``calib`` and ``phi`` are harvested in order,
    once per pass of the evaluation (all SAEs of a seed share a pass where memory allows), with
    the values the cache would have held; ``autointerp``, read by position, is harvested once
    per process into memory (its tokens x d x 2 bytes of RAM instead of disk)."""
    buffer_tokens: int = 262144
    """Tokens in the mixing buffer of a streamed split (half of it leaves, shuffled, per refill)."""

    def validate(self, where: str = "data") -> None:
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ConfigError(f"{where}.corpus must be a non-empty string")
        _pos_int(self.ctx_len, f"{where}.ctx_len")
        for name in ("train_tokens", "calib_tokens", "phi_tokens", "autointerp_tokens"):
            _pos_int(getattr(self, name), f"{where}.{name}")
        _nonneg_int(self.ce_tokens, f"{where}.ce_tokens")
        if self.ce_tokens > self.phi_tokens:
            raise ConfigError(f"{where}.ce_tokens ({self.ce_tokens}) must not exceed {where}.phi_tokens ({self.phi_tokens})")
        _pos_int(self.harvest_batch_rows, f"{where}.harvest_batch_rows")
        _pos_int(self.shard_tokens, f"{where}.shard_tokens")
        _nonneg_float(self.massive_norm_ratio, f"{where}.massive_norm_ratio")
        if 0 < self.massive_norm_ratio <= 1:
            raise ConfigError(f"{where}.massive_norm_ratio must be 0 (off) or above 1, not {self.massive_norm_ratio!r}")
        if self.cache_dtype not in ("float16", "bfloat16"):
            raise ConfigError(f"{where}.cache_dtype must be float16 or bfloat16, not {self.cache_dtype!r}")
        if not isinstance(self.stream_splits, list) or any(x not in STREAMABLE_SPLITS for x in self.stream_splits):
            raise ConfigError(f"{where}.stream_splits may only hold split names ({', '.join(STREAMABLE_SPLITS)}), "
                              f"not {self.stream_splits!r}")
        _pos_int(self.buffer_tokens, f"{where}.buffer_tokens")

    @property
    def total_tokens(self) -> int:
        return self.train_tokens + self.calib_tokens + self.phi_tokens + self.autointerp_tokens


@dataclass
class TrainConfig:
    batch_size: int = 4096
    """Tokens per primary step (the paper's code default)."""
    epochs: float = 1.0
    """Passes over the training split (the paper: one pass over 100M tokens)."""
    autocast: Literal["bfloat16", "none"] = "bfloat16"
    """Precision of the encoder GEMMs; master weights and optimiser stay fp32."""
    checkpoint_every_steps: int = 200
    """Resumable checkpoints every N primary steps (and at the end)."""
    eval_every_steps: int = 50
    """History rows (losses, L0, dead, penalty, tokens/s) every N steps."""
    threads: int = 0
    """torch threads; 0 = all cores."""
    snapshot_fractions: list[float] = field(default_factory=list)
    """Fractions of training (e.g. [0.25, 0.5]) at which the solo and replicated joint
    primaries are saved, for metrics along training (the "not fully converged" check)."""
    device: str = "cpu"
    """Where the SAEs train: 'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available).
    Checkpoints are always written from CPU copies, so they load anywhere."""
    runs_per_pass: int = 0
    """At most this many SAEs train at once; a seed's run list is then trained in several
    passes over the same batches in the same order (each run's weights are those of one
    pass with every run: tested), so that a large fan-out fits the GPU's memory.  A streamed
    training split is harvested again for each pass.  0 = every run of a seed in one pass."""

    def validate(self, where: str = "train") -> None:
        _pos_int(self.batch_size, f"{where}.batch_size")
        _pos_float(self.epochs, f"{where}.epochs")
        if self.autocast not in ("bfloat16", "none"):
            raise ConfigError(f"{where}.autocast must be 'bfloat16' or 'none', not {self.autocast!r}")
        _pos_int(self.checkpoint_every_steps, f"{where}.checkpoint_every_steps")
        _pos_int(self.eval_every_steps, f"{where}.eval_every_steps")
        _nonneg_int(self.threads, f"{where}.threads")
        _nonneg_int(self.runs_per_pass, f"{where}.runs_per_pass")
        for v in self.snapshot_fractions:
            if not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise ConfigError(f"{where}.snapshot_fractions values must be in (0, 1), not {v!r}")
        if not isinstance(self.device, str) or not (self.device in ("cpu", "cuda", "auto")
                                                    or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"{where}.device must be 'cpu', 'cuda', 'cuda:N' or 'auto', not {self.device!r}")


@dataclass
class GridConfig:
    lambda2: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    sigma2: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    control_lambda0: bool = True
    """Train the 'joint architecture, no penalty' control (lambda2 = 0)."""
    independent_solos: int = 1
    """Extra solo SAEs with other init seeds (run-to-run variance of |phi|)."""
    meta_sizes: list[int] = field(default_factory=list)
    """Meta-size ablation at the selected (lambda2, sigma2): m values."""
    ablation_lambda2: float = 0.3
    ablation_sigma2: float = 1.0
    ortho_coefs: list[float] = field(default_factory=list)
    """Orthogonality-penalty baselines (OrtSAE-style)."""
    full_seeds: int = 0
    """How many of the profile's first seeds train the whole run list (grid, ablations,
    baselines).  0 = every seed.  The other seeds train only what the headline test
    needs: solo, the replicated configuration, the lambda2 = 0 control and the
    independent solos."""
    replicate_lambda2: float = 0.3
    replicate_sigma2: float = 1.0
    """The joint configuration trained on every seed: the headline comparison, fixed
    before any result is seen (the paper's pick), so that it is not selected on the
    seeds it is tested on."""

    def validate(self, n_primary: int, where: str = "grid") -> None:
        if not self.lambda2:
            raise ConfigError(f"{where}.lambda2 must list at least one value")
        if not self.sigma2:
            raise ConfigError(f"{where}.sigma2 must list at least one value")
        for v in self.lambda2:
            _nonneg_float(v, f"{where}.lambda2")
        for v in self.sigma2:
            _pos_float(v, f"{where}.sigma2")
        _nonneg_int(self.independent_solos, f"{where}.independent_solos")
        for v in self.meta_sizes:
            _pos_int(v, f"{where}.meta_sizes")
            if v >= n_primary:
                raise ConfigError(f"{where}.meta_sizes value {v} must be smaller than sae.n_latents ({n_primary})")
        _nonneg_float(self.ablation_lambda2, f"{where}.ablation_lambda2")
        _pos_float(self.ablation_sigma2, f"{where}.ablation_sigma2")
        for v in self.ortho_coefs:
            _pos_float(v, f"{where}.ortho_coefs")
        _nonneg_int(self.full_seeds, f"{where}.full_seeds")
        _pos_float(self.replicate_lambda2, f"{where}.replicate_lambda2")
        _pos_float(self.replicate_sigma2, f"{where}.replicate_sigma2")
        if self.replicate_lambda2 not in self.lambda2 or self.replicate_sigma2 not in self.sigma2:
            raise ConfigError(f"{where}.replicate_lambda2 / replicate_sigma2 ({self.replicate_lambda2}, "
                              f"{self.replicate_sigma2}) must be a configuration of the grid "
                              f"(lambda2 {self.lambda2}, sigma2 {self.sigma2})")


@dataclass
class AutointerpConfig:
    backend: Literal["hf-local", "openai"] = "hf-local"
    model: str = "smollm2-135m"
    """The explainer (and the judge unless ``judge_model`` is set).  hf-local: a packaged judge
    (``metasae.autointerp.judges.JUDGE_MODELS``), a model registry key or a local folder; openai:
    the served model name."""
    judge_model: str = ""
    """The judge of the scorers and the validation set, if not ``model`` ("": ``model`` judges too);
    same backend and endpoint.  The explanations always come from ``model``."""
    base_url: str = ""
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself is never stored)."""
    local_int8: bool = False
    """hf-local only: the explainer's and judge's linear layers in int8 (weights per output channel,
    activations per token; ``metasae.autointerp.int8``), their output layer in the profile's dtype.
    About 1.5x the bf16 speed of the judge's layers on an AVX-512 CPU at a few percent relative error
    per layer (``benchmarks/judge_int8.py``); the model is named ``<model>+int8`` in records and caches,
    so nothing computed in bf16 is reused."""
    int8_keep: list[str] = field(default_factory=list)
    """With ``local_int8``: linear layers left in the profile's dtype, named by the end of their module
    name (e.g. ``down_proj``, the layer whose int8 rounding moves the judge's answers most:
    ``benchmarks/judge_int8_answers.py``).  The model is then named ``<model>+int8-keep-<layers>``; a
    name that ends no linear layer's stops the client when it loads."""
    n_pairs: int = 20
    """Matched pairs scored (a random sample of the alive matched pairs)."""
    n_pairs_embedding: int = 0
    """More matched pairs, explained and scored by the embedding scorer only (it needs no judge),
    beyond ``n_pairs``: they narrow the embedding comparisons' CIs at the explainer's cost alone."""
    window: int = 64
    """Tokens per context (ending at the firing token)."""
    n_explain_top: int = 30
    n_explain_per_lower: int = 5
    explain_token_counts: int = 0
    """List the N most frequent marked (firing) tokens of the explanation examples, with their
    counts, above the examples; 0 = the paper's prompt (examples only)."""
    explain_context: int = 0
    """Tokens of each explanation example shown to the explainer, ending at the firing token;
    0 = the whole window.  The explainer's cost on a CPU is reading its prompt, which this sets."""
    n_sim_per_quintile: int = 5
    n_fuzz_examples: int = 10
    """Activating examples per latent for fuzz/detection (as many non-activating)."""
    scorers: list[str] = field(default_factory=lambda: ["simulation", "fuzz", "detection", "embedding"])
    simulation_mode: Literal["json", "logprob"] = "json"
    """"json": the paper's code (a JSON array of 0-10 predictions); "logprob": one one-digit
    question per example, scored by the expected digit (needs log-probabilities)."""
    validation: bool = True
    """Score the judge validation set (synthetic latents with known answers) once per run."""
    n_validation_latents: int = 12
    """Synthetic latents of the validation set (each needs enough firings on the autointerp split)."""
    random_baseline_joint: bool = True
    """Also score the joint SAE's latents with random explanations (the solo's always are)."""
    timeout_s: float = 120.0
    max_retries: int = 3
    max_new_tokens: int = 120
    seed_only: int = -1
    """Run autointerp only for this seed (-1: every seed)."""

    def validate(self, where: str = "autointerp") -> None:
        if self.backend not in ("hf-local", "openai"):
            raise ConfigError(f"{where}.backend must be 'hf-local' or 'openai', not {self.backend!r}")
        if self.backend == "openai" and not self.base_url:
            raise ConfigError(f"{where}.base_url is required when {where}.backend is 'openai'")
        if self.local_int8 and self.backend != "hf-local":
            raise ConfigError(f"{where}.local_int8 applies to the 'hf-local' backend only, not {self.backend!r}: "
                              "a served model's arithmetic is the server's")
        if self.int8_keep and not self.local_int8:
            raise ConfigError(f"{where}.int8_keep names layers kept out of int8, and applies only with "
                              f"{where}.local_int8 = true")
        if any(not isinstance(k, str) or not k.strip() or "," in k for k in self.int8_keep):
            raise ConfigError(f"{where}.int8_keep must list module names (e.g. [\"down_proj\"]), "
                              f"not {self.int8_keep!r}")
        _nonneg_int(self.n_pairs, f"{where}.n_pairs")
        _nonneg_int(self.n_pairs_embedding, f"{where}.n_pairs_embedding")
        _pos_int(self.window, f"{where}.window")
        for name in ("n_explain_top", "n_explain_per_lower", "n_sim_per_quintile", "n_fuzz_examples"):
            _pos_int(getattr(self, name), f"{where}.{name}")
        for s in self.scorers:
            if s not in ("simulation", "fuzz", "detection", "embedding"):
                raise ConfigError(f"{where}.scorers has unknown scorer {s!r} (simulation, fuzz, detection, embedding)")
        if self.simulation_mode not in ("json", "logprob"):
            raise ConfigError(f"{where}.simulation_mode must be 'json' or 'logprob', not {self.simulation_mode!r}")
        _nonneg_int(self.explain_token_counts, f"{where}.explain_token_counts")
        _nonneg_int(self.explain_context, f"{where}.explain_context")
        _pos_int(self.n_validation_latents, f"{where}.n_validation_latents")
        _pos_float(self.timeout_s, f"{where}.timeout_s")
        _nonneg_int(self.max_retries, f"{where}.max_retries")
        _pos_int(self.max_new_tokens, f"{where}.max_new_tokens")


@dataclass
class SyntheticConfig:
    """Ground-truth benchmark on sae_lens.synthetic activations (issue: atomicity)."""

    enabled: bool = True
    num_features: int = 512
    hidden_dim: int = 64
    n_latents: int = 512
    k: int = 8
    meta_latents: int = 46
    meta_k: int = 4
    train_tokens: int = 409_600
    eval_tokens: int = 16_384
    batch_size: int = 1024
    lambda2: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    sigma2: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    extra: dict[str, Any] = field(default_factory=dict)
    """Passed to the synthetic model builder (correlation rank, hierarchy, ...);
    keys in EXTRA_KEYS, defaults in metasae.synthetic.GENERATOR_DEFAULTS."""
    lr: float = 3e-3
    """Adam learning rate of every SAE of the benchmark (primary and meta); higher than
    the paper's 3e-4 so that a few hundred CPU steps converge on the small world."""
    input_norm: Literal["standardize", "none"] = "standardize"
    """The primary's input normalisation (the paper's per-token standardisation by default)."""
    autocast: Literal["bfloat16", "none"] = "none"
    """Encoder GEMM precision while training (fp32 by default: small, exact, CPU)."""
    mixing_tau: float = 0.3
    """A latent mixes true features when >= 2 of them have |cos| >= max(mixing_tau,
    mixing_ratio * best |cos|) with its decoder row."""
    mixing_ratio: float = 0.5
    threads: int = 1
    """torch threads while the benchmark runs (restored after); 0 leaves torch's setting.
    The tensors are small: one thread avoids OpenMP spin-waits on a shared CPU."""

    EXTRA_KEYS = (  # a class attribute, not a field (no annotation)
        "zipf_exponent", "max_prob", "min_prob",
        "hierarchy_roots", "branching_min", "branching_max", "hierarchy_depth",
        "mutually_exclusive_portion", "compensate_probabilities",
        "correlation_rank", "correlation_scale",
        "magnitude_mean", "magnitude_std", "bias", "orthogonalize_steps",
    )

    def validate(self, where: str = "synthetic") -> None:
        unknown = sorted(set(self.extra) - set(self.EXTRA_KEYS))
        if unknown:
            raise ConfigError(f"{where}.extra has unknown key {unknown[0]!r} (known: {', '.join(self.EXTRA_KEYS)})")
        for key, value in self.extra.items():
            if isinstance(value, bool) and key != "compensate_probabilities" or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.extra.{key} must be a number, not {value!r}")
        _pos_float(self.lr, f"{where}.lr")
        _nonneg_int(self.threads, f"{where}.threads")
        if self.input_norm not in ("standardize", "none"):
            raise ConfigError(f"{where}.input_norm must be 'standardize' or 'none', not {self.input_norm!r}")
        if self.autocast not in ("bfloat16", "none"):
            raise ConfigError(f"{where}.autocast must be 'bfloat16' or 'none', not {self.autocast!r}")
        for name in ("mixing_tau", "mixing_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 < v <= 1.0:
                raise ConfigError(f"{where}.{name} must be in (0, 1], not {v!r}")
        for name in ("num_features", "hidden_dim", "n_latents", "k", "meta_latents", "meta_k",
                     "train_tokens", "eval_tokens", "batch_size"):
            _pos_int(getattr(self, name), f"{where}.{name}")
        if self.k >= self.n_latents:
            raise ConfigError(f"{where}.k ({self.k}) must be smaller than {where}.n_latents ({self.n_latents})")
        if self.meta_latents >= self.n_latents:
            raise ConfigError(f"{where}.meta_latents ({self.meta_latents}) must be smaller than {where}.n_latents ({self.n_latents})")
        if self.meta_k >= self.meta_latents:
            raise ConfigError(f"{where}.meta_k ({self.meta_k}) must be smaller than {where}.meta_latents ({self.meta_latents})")
        for v in self.lambda2:
            _nonneg_float(v, f"{where}.lambda2")
        for v in self.sigma2:
            _pos_float(v, f"{where}.sigma2")
        if not self.seeds:
            raise ConfigError(f"{where}.seeds must list at least one seed")
        for s in self.seeds:
            _nonneg_int(s, f"{where}.seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{where}.seeds must not repeat a seed ({self.seeds})")
        if self.train_tokens < self.batch_size:
            raise ConfigError(f"{where}.train_tokens ({self.train_tokens}) must be at least "
                              f"{where}.batch_size ({self.batch_size})")


@dataclass
class Profile:
    name: str = "default"
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    model: ModelSpecConfig = field(default_factory=ModelSpecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    autointerp: AutointerpConfig = field(default_factory=AutointerpConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    # -- validation -----------------------------------------------------
    def validate(self) -> "Profile":
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("name must be a non-empty string")
        if "/" in self.name or "\\" in self.name or self.name.startswith("."):
            # the name is a folder under outputs/ and figures/: it must not lead out of them
            raise ConfigError(f"name must be a folder-safe string (no '/', '\\' or leading '.'), not {self.name!r}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        for s in self.seeds:
            _nonneg_int(s, "seeds")
            if s > MAX_SEED:
                raise ConfigError(f"seeds must be at most {MAX_SEED:,}, not {s}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must not repeat a seed ({self.seeds})")
        self.model.validate()
        self.data.validate()
        self.sae.validate("sae")
        self.meta.validate(self.sae.n_latents)
        self.train.validate()
        if self.train.batch_size * self.sae.k < self.sae.k or self.train.batch_size < 1:
            raise ConfigError("train.batch_size must be positive")
        if self.data.train_tokens < self.train.batch_size:
            raise ConfigError(
                f"data.train_tokens ({self.data.train_tokens}) must be at least train.batch_size ({self.train.batch_size})"
            )
        self.grid.validate(self.sae.n_latents)
        for m in self.grid.meta_sizes:
            if m <= self.meta.k:
                raise ConfigError(f"grid.meta_sizes value {m} must be larger than meta.k ({self.meta.k})")
        self.autointerp.validate()
        if self.autointerp.window > self.data.ctx_len:
            raise ConfigError(
                f"autointerp.window ({self.autointerp.window}) must not exceed data.ctx_len ({self.data.ctx_len})")
        self.synthetic.validate()
        self._validate_against_model()
        self.runs_for_seed(self.seeds[0])  # duplicate run names
        return self

    def _validate_against_model(self) -> None:
        """Relations that need the model registry: layer < depth, d_in = width, ctx_len <= context."""
        spec = _registry_spec(self.model.name)
        if spec is None:  # not a registry model: the profile states d_in and nothing more can be checked
            return
        name = self.model.name
        if self.model.layer >= spec.n_layers:
            raise ConfigError(f"model.layer ({self.model.layer}) must be smaller than the number of layers "
                              f"of {name} ({spec.n_layers})")
        if self.sae.d_in != spec.d_model:
            raise ConfigError(f"sae.d_in ({self.sae.d_in}) must equal the width of {name} ({spec.d_model})")
        if self.data.ctx_len > spec.max_ctx:
            raise ConfigError(f"data.ctx_len ({self.data.ctx_len}) must not exceed the context length "
                              f"of {name} ({spec.max_ctx})")

    # -- derived --------------------------------------------------------
    def runs_for_seed(self, seed: int) -> list[RunSpec]:
        """Every SAE trained from one activation stream for one seed.

        Names are stable (they are folder names): ``solo``, ``joint_l{l}_s{s}``,
        ``joint_l0`` (control), ``solo_indep{i}``, ``meta_m{m}``, ``ortho_c{c}``.
        """
        g = self.grid
        full = self.is_full_seed(seed)
        runs = [RunSpec("solo", "solo", seed, tags={"role": "solo"})]
        for lam in g.lambda2:
            for sig in g.sigma2:
                if full or (lam, sig) == (g.replicate_lambda2, g.replicate_sigma2):
                    runs.append(RunSpec(joint_name(lam, sig), "joint", seed, lam, sig, tags={"role": "grid"}))
        if g.control_lambda0:
            runs.append(RunSpec("joint_l0", "joint", seed, 0.0, 1.0, tags={"role": "control"}))
        for i in range(1, g.independent_solos + 1):
            runs.append(RunSpec(f"solo_indep{i}", "solo", seed + 1000 * i, tags={"role": "independent_solo"}))
        if not full:
            return runs
        for m in g.meta_sizes:
            if m == self.meta.n_latents:
                continue
            runs.append(RunSpec(f"meta_m{m}", "joint", seed, g.ablation_lambda2, g.ablation_sigma2,
                                meta_latents=m, tags={"role": "meta_size"}))
        for c in g.ortho_coefs:
            runs.append(RunSpec(f"ortho_c{_fmt(c)}", "ortho", seed, ortho_coef=c, tags={"role": "ortho"}))
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"grid produces duplicate run names: {sorted(n for n in names if names.count(n) > 1)}")
        return runs

    def train_passes(self, seed: int) -> list[list[RunSpec]]:
        """The run list of `seed` cut, in order, into as few passes as ``train.runs_per_pass`` allows,
        of sizes that differ by at most one (9 runs at 4 a pass: 3, 3, 3).  A run that shares its
        primary with another (:func:`primary_owner`: the lambda2 = 0 control) goes into its
        owner's pass, right after it, and is not counted: it adds a meta SAE, not a primary."""
        runs = self.runs_for_seed(seed)
        sharers: dict[str, list[RunSpec]] = {}  # owner -> the runs on its primary, in order
        own = []
        for r in runs:
            o = primary_owner(r, runs)
            if o is None:
                own.append(r)
            else:
                sharers.setdefault(o.name, []).append(r)
        size = self.train.runs_per_pass or len(own)
        n = -(-len(own) // size)
        cuts = [len(own) * i // n for i in range(n + 1)]
        return [[x for o in own[a:b] for x in (o, *sharers.get(o.name, ()))] for a, b in zip(cuts, cuts[1:])]

    def train_memory_bytes(self, seed: int | None = None) -> int:
        """Estimated peak memory of one pass of a seed's fan-out trainer (the largest when None).

        Per SAE: W_enc, W_dec and b_dec in fp32, their gradients and Adam's two
        moments (x4), plus a meta SAE for joint runs; per step: the B x n
        pre-activations (bf16 and an fp32 copy), the AuxK block, the batch and its
        standardised copy.  A planning figure, kept conservative (x1.25).
        """
        d, n, B = self.sae.d_in or _registry_width(self.model.name), self.sae.n_latents, self.train.batch_size
        seeds = [seed] if seed is not None else list(self.seeds)
        best = 0
        for s in seeds:
            for group in self.train_passes(s):
                total = 0
                for r in group:
                    if primary_owner(r, group) is None:  # a shared primary is held once
                        total += 4 * (2 * n * d + d) * 4
                    if r.kind == "joint":
                        m = r.meta_latents or self.meta.n_latents
                        total += 4 * (2 * m * d + d) * 4 + n * d * 4 * 3
                    if r.kind == "ortho":
                        total += min(n, 4096) ** 2 * 6
                total += B * n * (2 + 4 + 4) + B * d * 4 * 6
                best = max(best, total)
        return int(best * 1.25)

    def is_full_seed(self, seed: int) -> bool:
        """Does `seed` train the whole run list (``grid.full_seeds``)?"""
        return self.grid.full_seeds == 0 or seed in self.seeds[:self.grid.full_seeds]

    @property
    def replicated_run(self) -> str:
        """Name of the joint configuration trained on every seed (the headline)."""
        return joint_name(self.grid.replicate_lambda2, self.grid.replicate_sigma2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_SECTIONS = {
    "model": ModelSpecConfig,
    "data": DataConfig,
    "sae": SAEConfig,
    "meta": MetaConfig,
    "train": TrainConfig,
    "grid": GridConfig,
    "autointerp": AutointerpConfig,
    "synthetic": SyntheticConfig,
}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_from_dict(raw: dict[str, Any]) -> Profile:
    """Build and validate a Profile from a plain dict (TOML or JSON)."""
    if not isinstance(raw, dict):
        raise ConfigError("a profile must be a table of settings")
    kwargs: dict[str, Any] = {}
    top_fields = {f.name for f in dataclasses.fields(Profile)}
    for key, value in raw.items():
        if key not in top_fields:
            raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(top_fields))})")
        cls = _SECTIONS.get(key)
        if cls is None:
            kwargs[key] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"section [{key}] must be a table")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for sub in value:
            if sub not in known:
                raise ConfigError(f"unknown setting {key}.{sub} (known: {', '.join(sorted(known))})")
        for sub, v in value.items():
            _check_type(v, known[sub], f"{key}.{sub}")
        kwargs[key] = cls(**value)
    if "seeds" in kwargs:
        seeds = kwargs["seeds"]
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"seeds must be a list of non-negative integers, not {seeds!r}")
    for key in ("name", "description"):
        if key in kwargs and not isinstance(kwargs[key], str):
            raise ConfigError(f"{key} must be a string")
    profile = Profile(**kwargs)
    if profile.sae.d_in == 0:
        d = _registry_width(profile.model.name)
        if d:
            profile.sae.d_in = d
    return profile.validate()


def load_profile(name_or_path: str | Path, seeds: list[int] | None = None) -> Profile:
    """Load ``profiles/<name>.toml`` (or a path to a .toml/.json file) and validate it."""
    path = Path(name_or_path)
    if path.suffix not in (".toml", ".json"):
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(
                f"unknown profile {str(name_or_path)!r}; available: {', '.join(available_profiles())}"
            )
    if not path.is_file():
        raise ConfigError(f"profile file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"profile file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if seeds is not None:
        raw["seeds"] = list(seeds)
    return profile_from_dict(raw)


MAX_SEED = 2**31 - 1 - 1_000_000
"""The largest seed: every generator (numpy's 32-bit seeds included) must accept the seeds
derived from it (+1000 per independent solo, +7919 for a meta SAE, +104729 for a penalty
generator), with room to spare."""


def parse_seeds(text: str) -> list[int]:
    """Parse '0,1,2' -> [0, 1, 2] with a one-sentence error otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not (p.isascii() and p.isdigit()) for p in parts):
        raise ConfigError(f"--seeds must be a comma-separated list of non-negative integers such as 0,1,2, not {text!r}")
    seeds = [int(p) for p in parts]
    too_big = [s for s in seeds if s > MAX_SEED]
    if too_big:
        raise ConfigError(f"--seeds must be at most {MAX_SEED:,} (seeds derived from a seed, such as an "
                          f"independent solo's, must fit every generator), not {too_big[0]}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must not repeat a seed ({text!r})")
    return seeds


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def joint_name(lambda2: float, sigma2: float) -> str:
    """Run name of a joint SAE of the grid."""
    return f"joint_l{_fmt(lambda2)}_s{_fmt(sigma2)}"


def _fmt(x: float) -> str:
    return f"{x:g}"


def _registry_spec(model_name: str) -> Any:
    """The registry's ModelSpec for `model_name`, or None (unknown name, or registry not importable)."""
    try:
        from metasae.activations.registry import MODEL_REGISTRY  # noqa: WPS433
    except Exception:  # registry not importable: the profile must state d_in
        return None
    return MODEL_REGISTRY.get(model_name)


def _registry_width(model_name: str) -> int:
    spec = _registry_spec(model_name)
    return int(getattr(spec, "d_model", 0) or 0) if spec else 0


def _check_type(value: Any, f: dataclasses.Field, where: str) -> None:
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
    if default is None:
        return
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        want = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        want = "a string"
    elif isinstance(default, list):
        ok = isinstance(value, list)
        want = "a list"
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
        want = "a table"
    else:
        return
    if not ok:
        raise ConfigError(f"{where} must be {want}, not {value!r}")


def _pos_int(v: Any, where: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{where} must be a positive integer, not {v!r}")


def _nonneg_int(v: Any, where: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{where} must be a non-negative integer, not {v!r}")


def _pos_float(v: Any, where: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{where} must be a positive number, not {v!r}")


def _nonneg_float(v: Any, where: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{where} must be a non-negative number, not {v!r}")
