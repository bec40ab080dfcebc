"""Ground-truth test of atomicity on synthetic activations (SPEC section 5).

The paper's evidence that joint latents are "more atomic" is the mean |phi| of
latent co-firing (a statistic the decomposability penalty itself pushes on)
plus an LLM judge.  On activations built from *known* features we can measure
atomicity directly: does the joint SAE recover the true features better than
the solo SAE, or does it only push decoder rows apart?

The world is built with ``sae_lens.synthetic`` (the field's standard
generator), never by hand:

* a :class:`~sae_lens.synthetic.FeatureDictionary` of ``num_features`` random
  unit directions in ``hidden_dim`` dimensions: superposition is controlled by
  the ratio (16x by default; optional orthogonalisation);
* Zipfian firing probabilities (a few common features, a long rare tail);
* a low-rank Gaussian-copula correlation between firings (features co-occur);
* a hierarchy forest over the most frequent features: a child fires only when
  its parent fires and siblings are mutually exclusive; this is where solo
  SAEs "absorb" a parent into its children and blend directions.

Sizes (the ``SyntheticConfig`` defaults), chosen for a shared 2-core CPU: the
benchmark trains five SAEs per seed (solo, three penalised joints, the
lambda2 = 0 control) in one fan-out, and three seeds must fit in about six
minutes.  ``num_features = n_latents = 512`` true features / latents in
``hidden_dim = 64`` dimensions (8x superposition; mean max |cos| to another
true feature ~0.39), Zipfian firing from 0.3 down to 0.01 (true L0 ~ 6.6)
against SAE k = 8, 16 hierarchy roots with 2-4 mutually exclusive children
each (~66 features in trees), rank-16 correlations, magnitudes 1 +- 0.25; meta
SAE 46 latents (9 %, the paper's ratio) with k = 4; 400 steps of 1024 tokens
at lr 3e-3, enough for the solo SAE to recover ~70 % of the true features at
|cos| >= 0.9 (MCC ~0.86).  A world of 2048 features in 128 dimensions was
tried first: at ~2.5 s per fan-out step its SAEs stayed far from converged
(MCC ~0.36) within the budget, which makes every comparison meaningless.
``sae_lens``'s dense sampler costs O(batch x num_features) per batch.  The
smoke profile shrinks everything (256 features in 64 dimensions).

Determinism: batch ``i`` of stream ``s`` ("train" or "eval") of seed ``seed``
is drawn under a private torch seed derived from ``(seed, s, i)``
(``numpy.random.SeedSequence``), so ``batch_source(start)`` resumes exactly
and the evaluation tokens never overlap the training tokens.  The world itself
(dictionary, firing probabilities, hierarchy, correlations) is a function of
``seed``: different seeds are different worlds *and* different SAE inits, so
the error bars cover both.

Metrics (per SAE, on ``eval_tokens`` fresh tokens, firing = the learned global
inference threshold, the same rule as the SAELens export):

* ``mcc``: mean correlation coefficient (Hungarian matching of decoder rows to
  true directions, mean |cos|; ``sae_lens``);
* ``precision / recall / f1 / accuracy``: each latent as a detector of its
  best-matching true feature (``sae_lens``'s ClassificationMetricsCalculator;
  mean over all latents, dead ones score 0);
* ``uniqueness``, ``l0``, ``true_l0``, ``dead_latents``, ``shrinkage``,
  ``explained_variance`` (``sae_lens`` calculators);
* ``mixing_frac``: fraction of alive latents whose decoder row mixes two or
  more true features: at least two true directions with
  ``|cos| >= max(tau, ratio * best |cos|)`` (tau = 0.3, ratio = 0.5).  A row
  equal to a true direction has best |cos| = 1 and its runner-up is the
  dictionary's coherence (~0.3 at most here), so it does not count; an
  absorbed child (child + parent)/sqrt(2) has two cosines ~0.7 and does;
* ``top2_ratio``: mean over alive latents of second-best / best |cos|;
* ``frac_recovered``: true features whose best alive latent has |cos| >= 0.9;
* ``mean_abs_phi``: the paper's headline, mean |phi| of binary co-firing over
  all pairs of latents alive on the eval tokens, exact, from the project's
  sparse co-firing counts (:mod:`metasae.metrics.cooccurrence`); the small
  dense :func:`mean_abs_phi` here is an independent check of it in the tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats
from tqdm.auto import tqdm

from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.synthetic import (
    ClassificationMetricsCalculator,
    DeadLatentsCalculator,
    FeatureDictionary,
    HierarchyConfig,
    L0Calculator,
    LowRankCorrelationConfig,
    OrthogonalizationConfig,
    ShrinkageCalculator,
    SyntheticModel,
    SyntheticModelConfig,
    ZipfianFiringProbabilityConfig,
    feature_uniqueness,
    mean_correlation_coefficient,
    orthogonal_initializer,
)
from sae_lens.util import temporary_seed

from metasae import paths
from metasae.checkpoint import config_fingerprint
from metasae.config import ConfigError, MetaConfig, RunSpec, SAEConfig, SyntheticConfig, TrainConfig
from metasae.io import atomic_write_json, read_json
from metasae.metrics.cooccurrence import CoFiringCounts, firing_from_dense, phi_summary
from metasae.sae import BatchTopKSAE
from metasae.trainer import FanOutTrainer

GENERATOR_DEFAULTS: dict[str, float] = {
    "zipf_exponent": 1.0,
    "max_prob": 0.3,
    "min_prob": 0.01,
    "hierarchy_roots": 16,
    "branching_min": 2,
    "branching_max": 4,
    "hierarchy_depth": 1,
    "mutually_exclusive_portion": 1.0,
    "compensate_probabilities": 1,
    "correlation_rank": 16,
    "correlation_scale": 0.15,
    "magnitude_mean": 1.0,
    "magnitude_std": 0.25,
    "bias": 0.0,
    "orthogonalize_steps": 0,
}
"""Generator options (``SyntheticConfig.extra`` overrides any of them).

``hierarchy_roots = 0`` or ``correlation_rank = 0`` switch that structure off.
The hierarchy's roots are the most frequent features (sae_lens numbers tree
nodes in order and Zipf probabilities decrease with the index); probability
compensation keeps each child's marginal firing rate near its Zipf value.
``bias = 0`` because the paper's per-token standardisation would turn a
constant offset into a token-dependent one (a confound, not a feature).
"""

METRICS = ("mcc", "f1", "precision", "recall", "mixing_frac", "top2_ratio", "frac_recovered", "mean_abs_phi",
           "uniqueness", "explained_variance", "l0", "dead_latents")
"""Per-SAE numbers in the results, in table order."""

HIGHER_IS_MORE_ATOMIC = {"mcc": True, "f1": True, "mixing_frac": False, "mean_abs_phi": False}
"""The four numbers the verdict compares: three ground-truth measures and the paper's proxy."""

_STREAMS = {"train": 0, "eval": 1}
RESULTS_FILE = "results.json"


# ---------------------------------------------------------------------------
# The synthetic world
# ---------------------------------------------------------------------------


def generator_options(cfg: SyntheticConfig) -> dict[str, float]:
    unknown = sorted(set(cfg.extra) - set(GENERATOR_DEFAULTS))
    if unknown:
        raise ConfigError(f"synthetic.extra has unknown key {unknown[0]!r} (known: {', '.join(GENERATOR_DEFAULTS)})")
    return {**GENERATOR_DEFAULTS, **cfg.extra}


def synthetic_model_config(cfg: SyntheticConfig, seed: int) -> SyntheticModelConfig:
    """The ``sae_lens`` SyntheticModelConfig for one seed's world."""
    o = generator_options(cfg)
    hierarchy = None
    if int(o["hierarchy_roots"]) > 0:
        lo, hi = int(o["branching_min"]), int(o["branching_max"])
        hierarchy = HierarchyConfig(
            total_root_nodes=int(o["hierarchy_roots"]),
            branching_factor=lo if lo == hi else (lo, hi),
            max_depth=int(o["hierarchy_depth"]),
            mutually_exclusive_portion=float(o["mutually_exclusive_portion"]),
            compensate_probabilities=bool(o["compensate_probabilities"]),
        )
    correlation = None
    if int(o["correlation_rank"]) > 0 and float(o["correlation_scale"]) > 0:
        correlation = LowRankCorrelationConfig(rank=int(o["correlation_rank"]),
                                               correlation_scale=float(o["correlation_scale"]))
    ortho = OrthogonalizationConfig(num_steps=int(o["orthogonalize_steps"])) if int(o["orthogonalize_steps"]) else None
    return SyntheticModelConfig(
        num_features=cfg.num_features,
        hidden_dim=cfg.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=float(o["zipf_exponent"]), max_prob=float(o["max_prob"]), min_prob=float(o["min_prob"])),
        hierarchy=hierarchy,
        correlation=correlation,
        orthogonalization=ortho,
        std_firing_magnitudes=float(o["magnitude_std"]),
        mean_firing_magnitudes=float(o["magnitude_mean"]),
        bias=float(o["bias"]) if float(o["bias"]) > 0 else False,
        seed=int(seed),
    )


def build_synthetic_model(cfg: SyntheticConfig, seed: int) -> SyntheticModel:
    """One seed's world (dictionary, firing law, hierarchy, correlations); deterministic in ``seed``."""
    import logging

    log = logging.getLogger("sae_lens.synthetic.synthetic_model")
    level = log.level
    log.setLevel(logging.ERROR)  # a few clamped compensated probabilities are expected, not news
    mcfg = synthetic_model_config(cfg, seed)
    feature_dict = None
    if mcfg.orthogonalization is not None:  # the same dictionary SyntheticModel would build, without its progress bar
        o = mcfg.orthogonalization
        feature_dict = FeatureDictionary(mcfg.num_features, mcfg.hidden_dim, bias=mcfg.bias, seed=mcfg.seed,
                                         initializer=orthogonal_initializer(o.num_steps, o.lr, False, o.chunk_size))
    try:
        model = SyntheticModel(mcfg, feature_dict=feature_dict)
    finally:
        log.setLevel(level)
    model.feature_dict.eval()
    return model


def batch_seed(seed: int, stream: str, index: int) -> int:
    """The torch seed of batch ``index`` of ``stream``: a function of (seed, stream, index) only."""
    return int(np.random.SeedSequence([int(seed), _STREAMS[stream], int(index)]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


class SyntheticBatchSource:
    """Deterministic, resumable batches for :class:`~metasae.trainer.FanOutTrainer`.

    ``source(start_batch)`` iterates over training batches ``start_batch,
    start_batch + 1, ...``; batch i is a function of (seed, i) alone.
    """

    def __init__(self, model: SyntheticModel, seed: int, batch_size: int):
        self.model, self.seed, self.batch_size = model, int(seed), int(batch_size)

    @torch.no_grad()
    def batch_with_features(self, index: int, stream: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden B x d, true feature activations B x num_features) of one batch."""
        with temporary_seed(batch_seed(self.seed, stream, index)):
            return self.model.sample_with_features(self.batch_size)

    def batch(self, index: int, stream: str = "train") -> torch.Tensor:
        return self.batch_with_features(index, stream)[0]

    def __call__(self, start_batch: int) -> Iterator[torch.Tensor]:
        i = int(start_batch)
        while True:
            yield self.batch(i)
            i += 1


def world_stats(model: SyntheticModel, source: SyntheticBatchSource, n_batches: int = 2) -> dict[str, Any]:
    """What the world looks like: superposition, true L0, structure sizes."""
    W = model.feature_dict.feature_vectors.detach()
    Wn = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (Wn @ Wn.t()).abs().fill_diagonal_(0)
    l0 = [float((source.batch_with_features(i, "eval")[1] > 0).sum(1).float().mean()) for i in range(n_batches)]
    h = model.hierarchy
    n_hier = len(h.feature_indices_used) if h is not None else 0
    return {
        "num_features": int(W.shape[0]), "hidden_dim": int(W.shape[1]),
        "superposition_ratio": W.shape[0] / W.shape[1],
        "mean_max_abs_cos": float(cos.max(dim=1).values.mean()), "max_abs_cos": float(cos.max()),
        "true_l0": float(np.mean(l0)), "hierarchy_features": n_hier,
        "hierarchy_roots": len(h.roots) if h is not None else 0,
        "correlation_rank": int(model.correlation_matrix.correlation_factor.shape[1])
        if model.correlation_matrix is not None else 0,
    }


# ---------------------------------------------------------------------------
# Evaluation against the ground truth
# ---------------------------------------------------------------------------


def _unit_rows(W: torch.Tensor) -> torch.Tensor:
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_mixing(W_dec_FD: torch.Tensor, W_true: torch.Tensor, alive_F: torch.Tensor | None = None,
                   tau: float = 0.3, ratio: float = 0.5, recovered_cos: float = 0.9) -> dict[str, float]:
    """Decoder-geometry atomicity: mixing fraction, top-2 ratio, recovered features.

    A latent mixes when >= 2 true directions have |cos| >= max(tau, ratio * best |cos|)
    with its decoder row (see the module docstring).  Only alive latents count.
    """
    C = _unit_rows(W_dec_FD) @ _unit_rows(W_true).t()
    C = C.abs()
    if alive_F is None:
        alive_F = torch.ones(C.shape[0], dtype=torch.bool)
    Ca = C[alive_F]
    if Ca.shape[0] == 0:
        return {"mixing_frac": float("nan"), "top2_ratio": float("nan"), "frac_recovered": 0.0, "n_alive": 0}
    top = torch.topk(Ca, 2, dim=1).values
    cut = torch.maximum(torch.full_like(top[:, 0], tau), ratio * top[:, 0])
    mixed = top[:, 1] >= cut
    best_per_true = Ca.max(dim=0).values
    return {
        "mixing_frac": float(mixed.float().mean()),
        "top2_ratio": float((top[:, 1] / top[:, 0].clamp_min(1e-12)).mean()),
        "frac_recovered": float((best_per_true >= recovered_cos).float().mean()),
        "n_alive": int(alive_F.sum()),
    }


def mean_abs_phi(rows: np.ndarray, cols: np.ndarray, n_tokens: int, n_latents: int) -> tuple[float, int]:
    """Mean |phi| of binary co-firing over all pairs of latents that fire (SPEC 3.2).

    ``(rows[j], cols[j])`` are the (token, latent) firing events.  Exact:
    phi_ij = (N11 N - Ni Nj) / sqrt(Ni (N - Ni) Nj (N - Nj)); latents that never
    fire (or fire on every token, phi undefined) are excluded and counted.
    Returns (mean |phi|, number of latents included).
    """
    N = int(n_tokens)
    A = sp.csr_matrix((np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(N, n_latents))
    A.sum_duplicates()
    A.data[:] = 1.0
    Ni = np.asarray(A.sum(axis=0)).ravel()
    keep = np.flatnonzero((Ni > 0) & (Ni < N))
    m = len(keep)
    if m < 2:
        return float("nan"), m
    Ak = A[:, keep]
    N11 = (Ak.T @ Ak).toarray()
    n = Ni[keep]
    s = np.sqrt(n * (N - n))
    phi = (N11 * N - np.outer(n, n)) / np.outer(s, s)
    iu = np.triu_indices(m, k=1)
    return float(np.abs(phi[iu]).mean()), m


@torch.no_grad()
def evaluate_sae(sae: BatchTopKSAE, source: SyntheticBatchSource, n_tokens: int,
                 tau: float = 0.3, ratio: float = 0.5) -> dict[str, Any]:
    """All ground-truth metrics of one SAE on the eval stream (see the module docstring)."""
    n_batches = max(1, math.ceil(n_tokens / source.batch_size))
    W_true = source.model.feature_dict.feature_vectors.detach()
    W_dec = sae.W_dec_FD.detach()
    n = W_dec.shape[0]
    true_l0, sae_l0 = L0Calculator(), L0Calculator()
    dead, shrink, ev = DeadLatentsCalculator(n), ShrinkageCalculator(), ExplainedVarianceCalculator()
    clf = ClassificationMetricsCalculator(W_dec, W_true)
    counts = CoFiringCounts(n)
    for i in range(n_batches):
        x, f = source.batch_with_features(i, "eval")
        acts = sae.encode(x)
        _, mu, std = sae.standardize(x.float())
        x_hat = sae.unstandardize(acts @ sae.W_dec_FD + sae.b_dec_D, mu, std)
        true_l0.add_batch(f)
        sae_l0.add_batch(acts)
        dead.add_batch(acts)
        shrink.add_batch(x_hat, x)
        ev.add_batch(x_hat, x)
        clf.add_batch(acts, f)
        counts.update(firing_from_dense(acts > 0))
    alive = torch.from_numpy(counts.N_i > 0)
    phi = phi_summary(counts)
    cm = clf.compute()
    return {
        "mcc": mean_correlation_coefficient(W_dec, W_true),
        "f1": cm.f1_score, "precision": cm.precision, "recall": cm.recall, "accuracy": cm.accuracy,
        **decoder_mixing(W_dec, W_true, alive, tau, ratio),
        "mean_abs_phi": phi.mean_abs_phi, "n_phi_latents": phi.n_alive,
        "uniqueness": feature_uniqueness(W_dec, W_true),
        "explained_variance": ev.compute(), "shrinkage": shrink.compute(),
        "l0": sae_l0.compute(), "true_l0": true_l0.compute(), "dead_latents": dead.compute(),
        "eval_tokens": counts.N,
    }


def sae_from_dictionary(model: SyntheticModel, k: int, input_norm: str = "none",
                        source: SyntheticBatchSource | None = None) -> BatchTopKSAE:
    """An SAE that *is* the true dictionary: decoder = the true directions, encoder =
    their transpose.  The ceiling of the decoder metrics, for tests and as a reference row.

    Its inference threshold is half the mean firing magnitude, or, given ``source``,
    calibrated on one training batch so that it fires as often as the true features do
    (the best single global threshold for a linear read-out under superposition).
    """
    W = model.feature_dict.feature_vectors.detach().float()
    F_, d = W.shape
    sae = BatchTopKSAE(SAEConfig(d_in=d, n_latents=F_, k=k, input_norm=input_norm))  # type: ignore[arg-type]
    with torch.no_grad():
        sae.W_dec_FD.copy_(_unit_rows(W))
        sae.W_enc_DF.copy_(_unit_rows(W).t())
        sae.b_dec_D.copy_(model.feature_dict.bias.detach().float())
        th = 0.5 * float(model.activation_generator.mean_firing_magnitudes.mean())
        if source is not None:
            x, f = source.batch_with_features(0, "train")
            pre = sae.pre_acts(x).flatten()
            n_fire = int((f > 0).sum())
            th = float(torch.topk(pre, min(max(n_fire, 1), pre.numel())).values[-1]) if n_fire else th
        sae.threshold.fill_(th)
    return sae


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:g}"


def benchmark_runs(cfg: SyntheticConfig, seed: int) -> list[RunSpec]:
    """solo, the lambda2 x sigma2 grid, and the lambda2 = 0 control (same init seed)."""
    runs = [RunSpec("solo", "solo", seed, tags={"role": "solo"})]
    for lam in cfg.lambda2:
        if lam == 0:
            continue
        for sig in cfg.sigma2:
            runs.append(RunSpec(f"joint_l{_fmt(lam)}_s{_fmt(sig)}", "joint", seed, float(lam), float(sig),
                                tags={"role": "grid"}))
    runs.append(RunSpec("joint_l0", "joint", seed, 0.0, float(cfg.sigma2[0]), tags={"role": "control"}))
    return runs


def benchmark_configs(cfg: SyntheticConfig) -> tuple[SAEConfig, MetaConfig, TrainConfig]:
    n_steps = cfg.train_tokens // cfg.batch_size
    sae_cfg = SAEConfig(d_in=cfg.hidden_dim, n_latents=cfg.n_latents, k=cfg.k, input_norm=cfg.input_norm,
                        lr=cfg.lr, aux_k=min(512, cfg.n_latents // 2),
                        dead_after_tokens=max(cfg.batch_size, min(20480, cfg.train_tokens // 4)))
    meta_cfg = MetaConfig(n_latents=cfg.meta_latents, k=cfg.meta_k)
    train_cfg = TrainConfig(batch_size=cfg.batch_size, autocast=cfg.autocast,
                            checkpoint_every_steps=max(1, n_steps // 4), eval_every_steps=max(1, n_steps // 20))
    return sae_cfg, meta_cfg, train_cfg


def _seed_fingerprint(cfg: SyntheticConfig, seed: int) -> str:
    d = dataclasses.asdict(cfg)
    d.pop("seeds")
    d.pop("enabled", None)
    d.pop("threads", None)  # speed only, not results
    return config_fingerprint({"cfg": d, "seed": seed, "generator": generator_options(cfg)})


def run_seed(cfg: SyntheticConfig, seed: int, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate one seed (resumable: a finished seed is read back, not recomputed)."""
    folder = paths.seed_dir(Path(out_dir), seed) / "synthetic"
    result_path = folder / RESULTS_FILE
    fp = _seed_fingerprint(cfg, seed)
    if result_path.is_file():
        old = read_json(result_path)
        if old.get("fingerprint") == fp:
            return old
    model = build_synthetic_model(cfg, seed)
    source = SyntheticBatchSource(model, seed, cfg.batch_size)
    sae_cfg, meta_cfg, train_cfg = benchmark_configs(cfg)
    runs = benchmark_runs(cfg, seed)
    trainer = FanOutTrainer(sae_cfg, meta_cfg, train_cfg, runs, folder / "checkpoints", progress=progress,
                            desc=f"synthetic seed {seed}")
    t0 = time.perf_counter()
    states = trainer.train(source, cfg.train_tokens // cfg.batch_size)
    t_train = time.perf_counter() - t0
    out_runs: dict[str, Any] = {}
    for st in states:
        metrics = evaluate_sae(st.primary, source, cfg.eval_tokens, cfg.mixing_tau, cfg.mixing_ratio)
        last = st.history[-1] if st.history else {}
        out_runs[st.spec.name] = {
            "kind": st.spec.kind, "role": st.spec.tags.get("role", ""), "lambda2": st.spec.lambda2,
            "sigma2": st.spec.sigma2, "final_train_mse": last.get("mse"), "final_penalty": last.get("penalty"),
            **metrics,
        }
    oracle = evaluate_sae(sae_from_dictionary(model, cfg.k, source=source), source, cfg.eval_tokens, cfg.mixing_tau,
                          cfg.mixing_ratio)
    result = {
        "seed": seed, "fingerprint": fp, "config": dataclasses.asdict(cfg),
        "generator": generator_options(cfg), "world": world_stats(model, source),
        "runs": out_runs, "true_dictionary": oracle,
        "seconds": {"train": t_train, "eval": time.perf_counter() - t0 - t_train},
        "n_steps": cfg.train_tokens // cfg.batch_size,
    }
    atomic_write_json(result_path, result)
    return result


def run_synthetic_benchmark(cfg: SyntheticConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Per seed: train solo + joint grid + control in one fan-out, then score against the ground truth.

    Returns ``{"config": ..., "seeds": {seed: per-seed result}}`` and writes it to
    ``<out_dir>/synthetic_results.json``; each seed's result lives in
    ``<out_dir>/seed<s>/synthetic/results.json`` next to its checkpoints.
    """
    cfg.validate()
    per_seed = {}
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        for seed in tqdm(cfg.seeds, desc="synthetic seeds", disable=not progress or len(cfg.seeds) < 2):
            per_seed[str(seed)] = run_seed(cfg, seed, out_dir, progress)
    finally:
        torch.set_num_threads(threads_before)
    results = {"config": dataclasses.asdict(cfg), "seeds": per_seed}
    atomic_write_json(Path(out_dir) / "synthetic_results.json", results)
    return results


# ---------------------------------------------------------------------------
# Aggregation and the verdict
# ---------------------------------------------------------------------------


def _runs_in_order(results: dict[str, Any]) -> list[str]:
    first = next(iter(results["seeds"].values()))
    return list(first["runs"].keys())


def _mean_se(xs: list[float]) -> tuple[float, float, int]:
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=float)
    if a.size == 0:
        return float("nan"), float("nan"), 0
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
    return float(a.mean()), se, int(a.size)


def per_seed_rows(results: dict[str, Any], metrics: tuple[str, ...] = METRICS) -> list[dict[str, Any]]:
    """One row per (seed, SAE), plus the true dictionary as a ceiling."""
    rows = []
    for seed, res in results["seeds"].items():
        for name, r in [*res["runs"].items(), ("true_dictionary", res["true_dictionary"])]:
            rows.append({"seed": int(seed), "run": name, "lambda2": r.get("lambda2"), "sigma2": r.get("sigma2"),
                         **{m: r.get(m) for m in metrics}})
    return rows


def summary_rows(results: dict[str, Any], metrics: tuple[str, ...] = METRICS) -> list[dict[str, Any]]:
    """Mean, standard error and n over seeds, per SAE (the notebook's table)."""
    rows = []
    for name in [*_runs_in_order(results), "true_dictionary"]:
        recs = [res["runs"][name] if name != "true_dictionary" else res["true_dictionary"]
                for res in results["seeds"].values()]
        row: dict[str, Any] = {"run": name, "lambda2": recs[0].get("lambda2"), "sigma2": recs[0].get("sigma2")}
        for m in metrics:
            mean, se, n = _mean_se([r.get(m) for r in recs])
            row[m], row[f"{m}_se"] = mean, se
            row["n"] = n
        rows.append(row)
    return rows


def paired_tests(results: dict[str, Any], metrics: tuple[str, ...] = tuple(HIGHER_IS_MORE_ATOMIC)
                 ) -> list[dict[str, Any]]:
    """Joint minus solo, paired by seed: mean difference, SE, paired t-test (scipy ttest_rel)."""
    out = []
    for name in _runs_in_order(results):
        if name == "solo":
            continue
        seeds = list(results["seeds"].values())
        for m in metrics:
            j = np.array([s["runs"][name][m] for s in seeds], dtype=float)
            o = np.array([s["runs"]["solo"][m] for s in seeds], dtype=float)
            d = j - o
            mean, se, n = _mean_se(list(d))
            t = p = float("nan")
            if n >= 2 and np.ptp(d) > 0:
                t, p = (float(v) for v in stats.ttest_rel(j, o))
            r0 = seeds[0]["runs"][name]
            out.append({"run": name, "role": r0.get("role"), "lambda2": r0.get("lambda2"), "sigma2": r0.get("sigma2"),
                        "metric": m, "joint": float(np.nanmean(j)), "solo": float(np.nanmean(o)), "diff": mean,
                        "diff_se": se, "t": t, "p": p, "n": n})
    return out


def verdict(results: dict[str, Any], alpha: float = 0.05) -> str:
    """A plain-language sentence computed from the numbers: does the joint SAE beat the
    solo SAE on the ground truth (MCC, F1, mixing), and does |phi| move with it?"""
    tests = [t for t in paired_tests(results) if t["role"] == "grid"]
    cells = sorted({t["run"] for t in tests}, key=lambda r: [t["run"] for t in tests].index(r))
    n_seeds = len(results["seeds"])
    if not cells:
        return "No penalised joint SAE was trained (lambda2 lists only 0), so there is nothing to compare."
    by = {(t["run"], t["metric"]): t for t in tests}
    k = len(cells)

    def better(t: dict[str, Any]) -> bool:
        return t["diff"] > 0 if HIGHER_IS_MORE_ATOMIC[t["metric"]] else t["diff"] < 0

    def sig(t: dict[str, Any]) -> bool:
        return math.isfinite(t["p"]) and t["p"] < alpha

    parts, wins = [], {}
    names = {"mcc": "MCC higher", "f1": "F1 higher", "mixing_frac": "fewer mixed latents",
             "mean_abs_phi": "mean |phi| lower"}
    for m in HIGHER_IS_MORE_ATOMIC:
        b = [c for c in cells if better(by[(c, m)])]
        s_b = [c for c in b if sig(by[(c, m)])]
        s_w = [c for c in cells if c not in b and sig(by[(c, m)])]
        wins[m] = (len(b), len(s_b), len(s_w))
        txt = f"{names[m]} in {len(b)}/{k}"
        if n_seeds >= 2:
            txt += f" ({len(s_b)} significantly better, {len(s_w)} significantly worse)"
        parts.append(txt)
    agree = sum(1 for c in cells if (by[(c, "mean_abs_phi")]["diff"] < 0) == (by[(c, "mcc")]["diff"] > 0))
    gt_sig_better = sum(wins[m][1] for m in ("mcc", "f1", "mixing_frac"))
    gt_sig_worse = sum(wins[m][2] for m in ("mcc", "f1", "mixing_frac"))
    gt_better = sum(wins[m][0] for m in ("mcc", "f1", "mixing_frac"))
    phi_down = wins["mean_abs_phi"][0]
    test = (f"paired t-tests over {n_seeds} seeds, alpha {alpha:g}" if n_seeds >= 2
            else "one seed, so no significance test: read it as descriptive")
    head = (f"Against the ground truth, the joint SAE versus the solo SAE over {k} penalised setting(s) "
            f"({test}): " + "; ".join(parts) + ". ")
    link = f"Mean |phi| moved in the same direction as ground-truth atomicity (MCC) in {agree}/{k} setting(s). "
    if n_seeds >= 2:
        if gt_sig_better > 0 and gt_sig_worse == 0:
            concl = "The penalty makes latents measurably more atomic by the ground truth"
        elif gt_sig_worse > 0 and gt_sig_better == 0:
            concl = "The penalty makes latents measurably less atomic by the ground truth"
        elif gt_sig_better == 0 and gt_sig_worse == 0:
            concl = "No ground-truth difference is significant"
        else:
            concl = "The ground-truth evidence is mixed"
    else:
        frac = gt_better / (3 * k)
        concl = ("The ground-truth measures lean towards the joint SAE" if frac > 0.5 else
                 "The ground-truth measures lean towards the solo SAE" if frac < 0.5 else
                 "The ground-truth measures are split")
    if phi_down > k / 2 and agree <= k / 2:
        concl += ", and lower |phi| did not track better feature recovery, so |phi| is not evidence of atomicity here."
    elif phi_down > k / 2:
        concl += ", and lower |phi| came with better feature recovery in most settings."
    else:
        concl += "; the penalty did not lower |phi| in most settings."
    return head + link + concl
