"""Idempotent, resumable stages that the notebooks call.

Each stage reads what earlier stages wrote under ``paths.output_root(profile)``
and caches its own result there, so a notebook rerun (or another notebook)
never repeats work: the model runs once per profile (the activation cache), the
SAEs of a seed train once (one fan-out), metrics are computed once per seed.

    ctx = open_run("default")                 # profile + folders + resolved config.json
    cache = ensure_activations(ctx)           # harvest (resumable)
    runs = train_seed(ctx, seed)              # every SAE of the seed, one stream
    ev = evaluate_seed(ctx, seed)             # EER thresholds, |phi|, L2, CE, firing stats
    rows = grid_rows(ctx, ev); sel = select_config(rows)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metasae import paths
from metasae.checkpoint import TrainedRun, load_trained_run, read_trainer, saelens_export_metadata
from metasae.config import Profile, RunSpec, load_profile, parse_seeds
from metasae.harness import git_state
from metasae.io import atomic_write_json, read_json
from metasae.plan import phi_groups

# ---------------------------------------------------------------------------
# Run context
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class RunContext:
    profile: Profile
    out: Path
    figures: Path

    @property
    def name(self) -> str:
        return self.profile.name


def open_run(profile: str, out_dir: str | Path = "", figures_dir: str | Path = "",
             seeds: str | list[int] | None = None) -> RunContext:
    """Load and validate the profile, create the folders, write the resolved config next to the outputs.
    Sets this process's allocator to keep freed memory (:mod:`metasae.allocator`)."""
    from metasae.allocator import keep_freed_memory

    keep_freed_memory()
    seed_list = parse_seeds(seeds) if isinstance(seeds, str) and seeds else (list(seeds) if seeds else None)
    prof = load_profile(profile, seeds=seed_list)
    out = paths.output_root(prof.name, out_dir or None)
    figs = paths.figures_root(prof.name, figures_dir or None)
    out.mkdir(parents=True, exist_ok=True)
    figs.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    resolved = prof.to_dict()
    if not cfg_path.is_file() or read_json(cfg_path) != resolved:
        atomic_write_json(cfg_path, resolved)
    return RunContext(prof, out, figs)


def set_threads(ctx: RunContext) -> None:
    """Torch threads: ``METASAE_THREADS`` (parallel seeds in the harness), else ``train.threads``."""
    from metasae.trainer import torch_threads

    n = torch_threads(ctx.profile.train.threads)
    if n:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------
# Activations and the model
# ---------------------------------------------------------------------------


def ensure_activations(ctx: RunContext, progress: bool = True):
    """Build (or resume, or just open) the profile's activation cache."""
    from metasae.activations.cache import build_cache

    # the process's one model (on train.device), loaded only when a shard is missing or a
    # streamed split is read
    return build_cache(ctx.profile, paths.activations_dir(ctx.out), progress=progress,
                       model_source=lambda: loaded_model(ctx))


@functools.lru_cache(maxsize=2)
def _loaded_model(name: str, dtype: str, hub_id: str, trust_remote_code: bool, device: str):
    from metasae.activations.models import load_model

    lm = load_model(name, dtype=dtype, hub_id=hub_id, trust_remote_code=trust_remote_code)
    if device != "cpu":
        lm.model.to(device)
    return lm


def loaded_model(ctx: RunContext):
    """The profile's language model, loaded once per process, on ``train.device``."""
    from metasae.trainer import resolve_device

    m = ctx.profile.model
    return _loaded_model(m.name, m.dtype, m.hub_id, m.trust_remote_code, str(resolve_device(ctx.profile.train.device)))


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def ckpt_root(ctx: RunContext, seed: int) -> Path:
    return paths.seed_dir(ctx.out, seed) / "checkpoints"


def train_seed(ctx: RunContext, seed: int, progress: bool = True, dist: Any = None) -> dict[str, TrainedRun]:
    """Train (or resume, or load) every SAE of `seed` from one pass of the activation stream.

    ``dist`` (:func:`metasae.distributed.init`, under torchrun): data parallel; rank 0 builds
    the activation cache while the others wait, and every rank trains on its rows of each
    global batch (of a streamed split, each rank harvests only its own rows)."""
    set_threads(ctx)
    runs = ctx.profile.runs_for_seed(seed)
    root = ckpt_root(ctx, seed)
    key = (str(root), seed)
    if key in _TRAINED:  # finished runs load (and verify checksums) once per process
        return _TRAINED[key]
    tr = read_trainer(root)
    if tr is None or not tr.get("complete"):
        _train(ctx, seed, progress, dist)
    _TRAINED[key] = {r.name: load_trained_run(root, r.name, _rebuild_hint(ctx, root)) for r in runs}
    return _TRAINED[key]


def train_pass(ctx: RunContext, seed: int, index: int, progress: bool = True) -> None:
    """Train (or resume) pass ``index`` of ``train.runs_per_pass`` alone: the harness runs the
    passes of a seed in separate processes side by side (``--jobs``), then notebook 01 finds
    them complete.  Each run's weights are those of training every pass in one process.  A seed
    whose training is complete (its ``trainer.json``) trains nothing, whatever its passes were."""
    tr = read_trainer(ckpt_root(ctx, seed))
    if tr is not None and tr.get("complete"):
        return
    _train(ctx, seed, progress, None, only=index)


def _train(ctx: RunContext, seed: int, progress: bool, dist: Any, only: int | None = None) -> None:
    from metasae.trainer import train_in_passes

    p = ctx.profile
    set_threads(ctx)
    runs = p.runs_for_seed(seed)
    root = ckpt_root(ctx, seed)
    main = dist is None or dist.is_main
    if not main:
        dist.barrier()  # rank 0 builds (or checks) the cache first
    cache = ensure_activations(ctx, progress=progress and main)
    if dist is not None and main:
        dist.barrier()
    B = p.train.batch_size
    cut = cache.massive_norm(p.data.massive_norm_ratio)
    if cache.streamed("train"):  # under torchrun each rank harvests its own rows
        batches, n_steps = _streamed_batches(ctx, cache, seed, cut, dist)
    else:
        n_steps = cache.num_batches("train", B, p.train.epochs, exclude_above=cut)

        def batches(start: int):  # under torchrun, this rank's rows of each global batch
            it = cache.iter_batches("train", B, seed=seed, epochs=p.train.epochs, start_batch=start,
                                    exclude_above=cut)
            return it if dist is None else (dist.shard(x) for x in it)

    def calib():  # held-out tokens for the inference threshold (L0 = k on them)
        return cache.valid_acts("calib", B)

    commit, dirty = git_state()
    passes = p.train_passes(seed)
    n_runs = len(runs) if only is None else len(passes[only]) if 0 <= only < len(passes) else 0
    train_in_passes(p.sae, p.meta, p.train, passes, batches, n_steps, root, calib=calib,
                    snapshot_steps=snapshot_steps(ctx, n_steps), snapshot_runs=("solo", p.replicated_run),
                    desc=f"seed {seed}: {n_runs} SAEs", progress=progress and main, dist=dist,
                    rebuild_hint=_rebuild_hint(ctx, root), only=only,
                    export_metadata=saelens_export_metadata(p, cache.manifest["bos_token_id"], cut, commit, dirty))


_TRAINED: dict[tuple[str, int], dict[str, TrainedRun]] = {}


def _streamed_batches(ctx: RunContext, cache, seed: int, cut: float, dist: Any = None):
    """(batches(start) -> iterator, n_steps) of a streamed training split (metasae.activations.stream):
    the language model harvests while the SAEs train; the trainer only sees the batches.  Under
    ``dist`` each rank harvests its own rows and yields its share of every global batch."""
    from metasae.activations.stream import planned_batches, stream_batches

    p = ctx.profile
    massive = float(np.mean(cache.token_norms("calib") > cut)) if math.isfinite(cut) else 0.0
    n_steps = planned_batches(cache.n_valid("train"), p.train.epochs, p.train.batch_size, massive)
    tokens, mask, lm = cache.tokens("train"), cache.mask("train"), loaded_model(ctx)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[p.data.cache_dtype]
    # under torchrun, this rank's share (the trainer refuses a batch that does not split, before any harvest)
    shard = (0, 1) if dist is None else (dist.rank, dist.world_size)
    B = p.train.batch_size // shard[1]

    def batches(start: int):
        return stream_batches(lm, p.model.layer, tokens, mask, batch_size=B, seed=seed,
                              n_batches=n_steps, buffer_tokens=p.data.buffer_tokens,
                              harvest_rows=p.data.harvest_batch_rows, cache_dtype=dtype, exclude_above=cut,
                              start_batch=start, shard=shard)

    return batches, n_steps


def snapshot_steps(ctx: RunContext, n_steps: int) -> tuple[int, ...]:
    """Primary steps at which solo and the replicated joint are saved (``train.snapshot_fractions``)."""
    return tuple(sorted({max(1, int(round(f * n_steps))) for f in ctx.profile.train.snapshot_fractions} - {n_steps}))


def _rebuild_hint(ctx: RunContext, folder: Path) -> str:
    return f"delete {folder} and rerun `bash run_all.sh --profile {ctx.name} --out {ctx.out}`"


def history_rows(trained: dict[str, TrainedRun]) -> list[dict[str, Any]]:
    """Flat training-history rows (one per run and logged step) for curves and tables."""
    rows = []
    for name, tr in trained.items():
        for h in tr.history:
            rows.append({"run": name, "role": tr.spec.tags.get("role", ""), "kind": tr.spec.kind,
                         "lambda2": tr.spec.lambda2, "sigma2": tr.spec.sigma2, **h})
    return rows


# ---------------------------------------------------------------------------
# Evaluation: thresholds, reconstruction, co-firing, CE
# ---------------------------------------------------------------------------


def metrics_dir(ctx: RunContext, seed: int) -> Path:
    return paths.seed_dir(ctx.out, seed) / "metrics"


def _eer_max_value(sae, x: torch.Tensor) -> float:
    """The paper's 200 bins on [0, 10) when kept activations fit; otherwise a wider range.

    Our standardised inputs can give pre-activations above 10 (the paper's
    range was chosen for GPT-2); values above the range would all land in the
    last bin, so the range grows to twice the 99.9th percentile of kept values.
    """
    pre = sae.pre_acts(x)
    kept = pre[sae.batch_topk_mask(pre)]
    q = float(torch.quantile(kept[:100000], 0.999)) if kept.numel() else 0.0
    return 10.0 if q < 10.0 else float(math.ceil(2 * q))


def eer_thresholds(cache, saes: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """EER thresholds of several SAEs (name -> sae) in one pass over the calibration split (one
    harvest when it is streamed); each SAE's histogram range from the split's first batch."""
    from metasae.metrics.thresholds import calibrate_eer_thresholds_many

    if not saes:
        return {}
    x0 = next(iter(cache.valid_acts("calib", batch_size)))
    return calibrate_eer_thresholds_many({nm: (sae, _eer_max_value(sae, x0)) for nm, sae in saes.items()},
                                         cache.valid_acts("calib", batch_size), batch_size=batch_size)


def thresholds_for(ctx: RunContext, seed: int, name: str, run: TrainedRun, cache=None):
    """EER thresholds of one SAE on the calibration split (cached next to its checkpoint)."""
    return thresholds_for_many(ctx, seed, {name: run}, cache, progress=False)[name]


def thresholds_for_many(ctx: RunContext, seed: int, trained: dict[str, TrainedRun], cache=None,
                        progress: bool = True) -> dict[str, Any]:
    """EER thresholds of every SAE in ``trained`` on the calibration split, cached next to their
    checkpoints: the missing ones in one pass (:func:`eer_thresholds`)."""
    from metasae.metrics.thresholds import load_eer_thresholds, save_eer_thresholds

    paths_ = {nm: metrics_dir(ctx, seed) / nm / "thresholds.safetensors" for nm in trained}
    out = {nm: load_eer_thresholds(p) for nm, p in paths_.items() if p.is_file()}
    todo = {nm: run.sae for nm, run in trained.items() if nm not in out}
    if todo:
        cache = cache or ensure_activations(ctx, progress=False)
        if progress:
            print(f"EER thresholds of {len(todo)} SAEs on the calibration split"
                  + (" (harvested)" if cache.streamed("calib") else ""))
        for nm, res in eer_thresholds(cache, todo, ctx.profile.train.batch_size).items():
            save_eer_thresholds(res, paths_[nm], include_hist=False)
            out[nm] = res
    return {nm: out[nm] for nm in trained}


def _ce_rows(ctx: RunContext, cache) -> tuple[torch.Tensor, torch.Tensor]:
    d = ctx.profile.data
    tokens, mask = cache.tokens("phi"), cache.mask("phi")
    rows = max(1, -(-d.ce_tokens // d.ctx_len))
    return tokens[:rows], mask[:rows]


def evaluate_seed(ctx: RunContext, seed: int, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Per SAE of the seed: EER thresholds, reconstruction, firing statistics, |phi| summary, CE.

    Cached in ``seed<s>/metrics/eval.json`` (+ per-run phi summaries and firing
    rates); a rerun loads it.  CE (a spliced forward of the model) is computed
    for the solo, grid and control runs when ``data.ce_tokens`` > 0.
    """
    from metasae.metrics.cooccurrence import PhiSummary, phi_summary
    from metasae.metrics.recon import ce_summary
    from metasae.metrics.thresholds import THRESHOLDS_FILE

    mdir = metrics_dir(ctx, seed)
    summary_path = mdir / "eval.json"
    trained = train_seed(ctx, seed, progress=progress)
    if summary_path.is_file():
        ev = read_json(summary_path)
        if sorted(ev) == sorted(trained):
            return ev
    cache = ensure_activations(ctx, progress=False)
    names = list(trained)
    # a control whose primary is its solo's, bitwise (trained once: config.primary_owner), gets the
    # solo's thresholds, reconstruction, firing statistics, |phi| and CE, without computing them again
    same = shared_primaries(trained)
    own = {nm: trained[nm] for nm in names if nm not in same}
    thr = thresholds_for_many(ctx, seed, own, cache, progress)
    ev: dict[str, dict[str, Any]] = {}
    # one encoder pass per SAE over the phi split, in batches of the training size: reconstruction
    # (EER rule and BatchTopK rule), firing statistics and the exact co-firing counts together;
    # the SAEs whose counts fit in memory at once share one pass over the split (one harvest
    # when it is streamed)
    for nm, rec, counts in phi_pass(ctx, cache, {nm: (trained[nm].sae, thr[nm]) for nm in own}, progress):
        run = trained[nm].sae
        rates = rec.pop("firing_rates")
        rec.pop("firing_counts")
        atomic_write_json(mdir / nm / "firing_rates.json", {"firing_rates": [float(r) for r in rates]})
        rec["eer_fallbacks"] = thr[nm].counts_by_fallback()
        rec["eer_max_value"] = float(thr[nm].max_value)
        rec["run"] = dataclasses.asdict(trained[nm].spec)
        if trained[nm].meta is not None:
            rec.update(meta_fit(trained[nm].meta, run))
        s: PhiSummary = phi_summary(counts)
        del counts
        atomic_write_json(mdir / nm / "phi_summary.json", s.to_dict())
        rec.update({"mean_abs_phi": s.mean_abs_phi, "n_pairs": s.n_pairs, "n_alive_phi": s.n_alive,
                    "n_never_fired": s.n_never_fired, "n_always_fired": s.n_always_fired,
                    "var_abs_phi": s.var_abs_phi, "mean_phi": s.mean_phi})
        ev[nm] = rec
    # CE with the SAE spliced in
    if ctx.profile.data.ce_tokens > 0:
        from metasae.activations.harvest import ce_with_splices

        lm = loaded_model(ctx)
        tokens, mask = _ce_rows(ctx, cache)
        ce_names = [nm for nm in own if trained[nm].spec.tags.get("role") in ("solo", "grid", "control")]
        cut = cache.massive_norm(ctx.profile.data.massive_norm_ratio)
        fns = {nm: splice_fn(trained[nm].sae, cut) for nm in ce_names}
        if math.isfinite(cut):  # the same SAEs with every token spliced, massive activations included
            for nm in ce_names:
                if nm in ("solo", "joint_l0", ctx.profile.replicated_run):
                    fns[f"{nm}::all"] = splice_fn(trained[nm].sae, float("inf"))
        if progress:
            print(f"CE with {len(fns)} splices, on {int(mask.sum())} tokens")
        raw_all = ce_with_splices(lm, ctx.profile.model.layer, tokens, mask, fns,
                                  batch_rows=ctx.profile.data.harvest_batch_rows)
        for nm, raw in raw_all.items():
            if nm.endswith("::all"):
                summ = ce_summary(raw)
                ev[nm[:-5]].update({"ce_all_tokens": raw, "ce_loss_score_all_tokens": summ["ce_loss_score"],
                                    "delta_ce_pct_all_tokens": summ["delta_ce_pct"]})
            else:
                ev[nm].update({"ce": raw, **ce_summary(raw), "ce_massive_passthrough": math.isfinite(cut)})
    # a shared primary's files and record are its owner's (CE included); its meta SAE's fit its own
    for nm, owner in same.items():
        (mdir / nm).mkdir(parents=True, exist_ok=True)
        for f in (THRESHOLDS_FILE, "firing_rates.json", "phi_summary.json"):
            shutil.copyfile(mdir / owner / f, mdir / nm / f)
        ev[nm] = {**ev[owner], "run": dataclasses.asdict(trained[nm].spec), "primary_of": owner}
        ev[nm].pop("meta_explained_variance", None)
        ev[nm].pop("meta_mean_sq_distance", None)
        if trained[nm].meta is not None:
            ev[nm].update(meta_fit(trained[nm].meta, trained[nm].sae))
    ev = {nm: ev[nm] for nm in names}
    atomic_write_json(summary_path, ev)
    return ev


def shared_primaries(trained: dict[str, TrainedRun]) -> dict[str, str]:
    """name -> owner for the runs whose primary is another run's (:func:`~metasae.config.primary_owner`)
    and whose saved weights, buffers included, equal the owner's bitwise (checked, not assumed)."""
    from metasae.config import primary_owner

    specs = [t.spec for t in trained.values()]
    out = {}
    for nm, t in trained.items():
        owner = primary_owner(t.spec, specs)
        if owner is None or owner.name not in trained:
            continue
        a, b = t.sae.state_dict(), trained[owner.name].sae.state_dict()
        if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a):
            out[nm] = owner.name
    return out


def phi_pass(ctx: RunContext, cache, models: dict[str, tuple], progress: bool = True):
    """Yield (name, metrics, co-firing counts) of several SAEs (name -> (sae, thresholds)) on the phi
    split: :func:`~metasae.metrics.recon.reconstruction_metrics` with counts, in as few passes as
    the counts allow in memory (:func:`phi_groups`; a streamed phi split is harvested once per
    pass).  A group's counts exist only while it is counted and handed out."""
    from metasae.harness import available_memory_bytes
    from metasae.metrics.cooccurrence import CoFiringCounts
    from metasae.metrics.recon import reconstruction_metrics_many
    from metasae.plan import gpu_memory_bytes
    from metasae.trainer import resolve_device

    B = ctx.profile.train.batch_size
    device = str(resolve_device(ctx.profile.train.device))
    groups = phi_groups({nm: int(m[0].cfg.n_latents) for nm, m in models.items()}, device,
                        available_memory_bytes(), gpu_memory_bytes(device))
    n_batches = -(-cache.n_valid("phi") // B)
    for i, group in enumerate(groups):
        counts = {nm: CoFiringCounts(models[nm][0].cfg.n_latents) for nm in group}
        batches = cache.valid_acts("phi", B)
        if progress:
            from tqdm.auto import tqdm

            what = "harvest + " if cache.streamed("phi") else ""
            batches = tqdm(batches, total=n_batches, dynamic_ncols=True,
                           desc=f"{what}reconstruction + co-firing, {len(group)} SAEs (pass {i + 1}/{len(groups)})")
        recs = reconstruction_metrics_many({nm: (*models[nm], counts[nm]) for nm in group}, batches)
        for nm in group:
            yield nm, recs.pop(nm), counts.pop(nm)


@torch.no_grad()
def meta_fit(meta, primary) -> dict[str, float]:
    """How well the meta SAE rebuilds the final primary decoder rows: explained variance
    1 - sum ||W_i - W_hat_i||^2 / sum ||W_i - mean W||^2 (rows as the meta SAE reads them,
    its training rule), and the mean penalty term's distance ||W_i - W_hat_i||^2."""
    from metasae.sae import meta_reconstruction

    W = primary.W_dec_FD.detach().float()
    W_hat = meta_reconstruction(meta, W)
    err = (W - W_hat).pow(2).sum(1)
    tss = float((W - W.mean(0)).pow(2).sum())
    return {"meta_explained_variance": 1.0 - float(err.sum()) / tss if tss > 0 else float("nan"),
            "meta_mean_sq_distance": float(err.mean())}


def splice_fn(sae, massive_norm: float = float("inf")):
    """What the CE splice puts in place of the activations: the SAE's reconstruction under its
    global threshold (the one inference rule), with tokens whose norm exceeds `massive_norm`
    passed through unchanged (``data.massive_norm_ratio``)."""
    def fn(x):
        xf = x.float().cpu()
        out = sae.reconstruct(xf)
        if math.isfinite(massive_norm):
            keep = xf.norm(dim=1) > massive_norm
            out[keep] = xf[keep]
        return out.to(x.device, x.dtype)
    return fn


def snapshot_phi(ctx: RunContext, seed: int, progress: bool = True) -> list[dict[str, Any]]:
    """Mean |phi| of solo and the replicated joint at their training snapshots and at the end
    (``train.snapshot_fractions``): the paper's "not fully converged" question, per seed.

    Each snapshot gets its own EER thresholds (calibration split) and its co-firing
    counts on the phi split, as the final SAEs do.  Cached in ``metrics/snapshots.json``.
    """
    from safetensors.torch import load_file

    from metasae.checkpoint import SAE_FILE, load_sae_tensors
    from metasae.metrics.cooccurrence import phi_summary
    from metasae.sae import BatchTopKSAE

    path = metrics_dir(ctx, seed) / "snapshots.json"
    if path.is_file():
        return read_json(path)["rows"]
    trained = train_seed(ctx, seed, progress=progress)
    ev = evaluate_seed(ctx, seed, progress=progress)
    tr = read_trainer(ckpt_root(ctx, seed))
    n_steps, B = int(tr["n_steps"]), int(tr["batch_size"])
    cache = ensure_activations(ctx, progress=False)
    saes: dict[str, Any] = {}  # "run@step" -> the snapshot's SAE
    runs = [nm for nm in ("solo", ctx.profile.replicated_run) if nm in trained]
    for nm in runs:
        for folder in sorted((trained[nm].folder.parent / "snapshots").glob("step*")):
            sae = BatchTopKSAE(trained[nm].sae.cfg)
            load_sae_tensors(sae, load_file(str(folder / SAE_FILE)))
            saes[f"{nm}@{int(read_json(folder / 'snapshot.json')['step'])}"] = sae
    # each snapshot gets its own thresholds (one pass over the calibration split for all), then
    # its counts (one pass over the phi split, or as few as memory allows)
    thr = eer_thresholds(cache, saes, B)
    phi = {k: phi_summary(counts).mean_abs_phi
           for k, _, counts in phi_pass(ctx, cache, {k: (sae, thr[k]) for k, sae in saes.items()}, progress)}
    rows = []
    for nm in runs:
        for key in saes:
            run, step = key.rsplit("@", 1)
            if run == nm:
                rows.append({"run": nm, "step": int(step), "tokens": int(step) * B, "frac": int(step) / n_steps,
                             "mean_abs_phi": phi[key]})
        rows.append({"run": nm, "step": n_steps, "tokens": n_steps * B, "frac": 1.0,
                     "mean_abs_phi": ev[nm]["mean_abs_phi"]})
    atomic_write_json(path, {"rows": rows})
    return rows


def load_phi_summary(ctx: RunContext, seed: int, name: str):
    from metasae.metrics.cooccurrence import PhiSummary

    return PhiSummary.from_dict(read_json(metrics_dir(ctx, seed) / name / "phi_summary.json"))


def load_firing_rates(ctx: RunContext, seed: int, name: str) -> np.ndarray:
    return np.asarray(read_json(metrics_dir(ctx, seed) / name / "firing_rates.json")["firing_rates"])


# ---------------------------------------------------------------------------
# Table 1 and the selection rule
# ---------------------------------------------------------------------------


def grid_rows(ctx: RunContext, ev: dict[str, dict[str, Any]], baseline: str = "solo") -> list[dict[str, Any]]:
    """One row per SAE: Delta mean|phi| %, Delta L2 %, Delta CE (percentage points of clean CE) vs `baseline`.

    Every reconstruction metric (Delta L2, CE, KL) uses one rule: the SAE's global
    inference threshold, calibrated to L0 = k on held-out tokens; the MSE under
    BatchTopK and under the EER thresholds is carried beside it.  Delta CE % is each SAE's CE overhead as % of the
    clean CE (the paper's column), and its difference from the solo's.
    """
    from metasae.metrics.recon import delta_pct

    base = ev[baseline]
    rows = []
    for nm, e in ev.items():
        spec = e["run"]
        row = {
            "run": nm, "role": spec["tags"].get("role", ""), "kind": spec["kind"], "lambda2": spec["lambda2"],
            "sigma2": spec["sigma2"], "meta_latents": spec["meta_latents"] or ctx.profile.meta.n_latents,
            "ortho_coef": spec["ortho_coef"],
            "mean_abs_phi": e["mean_abs_phi"], "mse": e["mse"], "mse_batchtopk": e.get("mse_batchtopk"),
            "mse_eer": e.get("mse_eer"), "l0": e.get("l0_threshold", e["l0"]), "l0_eer": e["l0"],
            "dead": e["dead"], "explained_variance_std": e.get("explained_variance_std"),
            "explained_variance": e["explained_variance"],
            "delta_abs_phi_pct": delta_pct(e["mean_abs_phi"], base["mean_abs_phi"]),
            "delta_l2_pct": delta_pct(e["mse"], base["mse"]),
        }
        if "delta_ce_pct" in e:
            row["delta_ce_pct"] = e["delta_ce_pct"]
            row["ce_loss_score"] = e["ce_loss_score"]
            row["kl_spliced"] = e["ce"]["kl_spliced"]
            if "delta_ce_pct" in base:
                row["delta_ce_vs_solo_pp"] = e["delta_ce_pct"] - base["delta_ce_pct"]
        rows.append(row)
    return rows


def select_config(rows: list[dict[str, Any]], max_delta_l2_pct: float = 10.0) -> str:
    """The paper's rule: "best configuration on mean |phi| while considering reconstruction quality".

    Written as: among the grid configurations on the Pareto front of
    (Delta |phi|, Delta L2) whose Delta L2 is at most `max_delta_l2_pct` (the
    paper's pick cost +9.3%), take the lowest Delta |phi|; if none is that
    cheap, the cheapest configuration that lowers |phi|, else the lowest Delta |phi|.
    """
    grid = [r for r in rows if r["role"] == "grid" and np.isfinite(r["delta_abs_phi_pct"])]
    if not grid:
        raise ValueError("no grid configuration has a finite Delta |phi|")
    front = [r for r in grid if not any(
        (o["delta_abs_phi_pct"] <= r["delta_abs_phi_pct"] and o["delta_l2_pct"] <= r["delta_l2_pct"]
         and (o["delta_abs_phi_pct"] < r["delta_abs_phi_pct"] or o["delta_l2_pct"] < r["delta_l2_pct"]))
        for o in grid)]
    ok = [r for r in front if r["delta_l2_pct"] <= max_delta_l2_pct]
    if ok:
        return min(ok, key=lambda r: r["delta_abs_phi_pct"])["run"]
    lower = [r for r in grid if r["delta_abs_phi_pct"] < 0]
    if lower:
        return min(lower, key=lambda r: r["delta_l2_pct"])["run"]
    return min(grid, key=lambda r: r["delta_abs_phi_pct"])["run"]


def selected_config(ctx: RunContext, seed: int | None = None) -> str:
    """The joint configuration every seed compares with its solo: ``grid.replicate_*``.

    It is fixed in the profile before any result is seen (the paper's pick), so
    the seeds that test it are not also the seeds that chose it.  What the
    paper's selection rule picks on the first full seed is reported beside it
    (:func:`rule_selection`)."""
    return ctx.profile.replicated_run


def rule_selection(ctx: RunContext) -> dict[str, Any]:
    """The paper's selection rule (:func:`select_config`) applied to the first seed that trains the
    whole grid; recorded in ``selection.json`` next to the replicated configuration."""
    path = ctx.out / "selection.json"
    if path.is_file():
        rec = read_json(path)
        if rec.get("replicated") == ctx.profile.replicated_run and "selected_by_rule" in rec:
            return rec
    full = [s for s in ctx.profile.seeds if ctx.profile.is_full_seed(s)]
    s0 = full[0] if full else ctx.profile.seeds[0]
    rows = grid_rows(ctx, evaluate_seed(ctx, s0, progress=False))
    rec = {"replicated": ctx.profile.replicated_run, "selected_by_rule": select_config(rows), "chosen_on_seed": s0,
           "rule": select_config.__doc__.split("\n")[0]}
    atomic_write_json(path, rec)
    return rec


# ---------------------------------------------------------------------------
# Autointerp on Hungarian-matched pairs
# ---------------------------------------------------------------------------


def matched_pairs(ctx: RunContext, seed: int, joint: str, solo: str = "solo"):
    """Hungarian matching of joint to solo latents on decoder cosine, both alive on the phi split."""
    from metasae.metrics.matching import hungarian_match

    trained = train_seed(ctx, seed, progress=False)
    rj, rs = load_firing_rates(ctx, seed, joint), load_firing_rates(ctx, seed, solo)
    return hungarian_match(trained[joint].sae.W_dec_FD, trained[solo].sae.W_dec_FD, rj > 0, rs > 0)


def _contexts_for(ctx: RunContext, seed: int, name: str, latents: list[int], cache, tokenizer):
    from metasae.autointerp.contexts import build_all_contexts, collect_firings

    trained = train_seed(ctx, seed, progress=False)
    sae = trained[name].sae
    thr = thresholds_for(ctx, seed, name, trained[name], cache)
    acts, tokens, mask = cache.split_arrays("autointerp")
    fir = collect_firings(sae, thr.thresholds_F, acts, mask, latents=latents,
                          path=metrics_dir(ctx, seed) / name / "autointerp_firings.npz")
    return build_all_contexts(latents, fir, tokens, ctx.profile.autointerp, seed, sae=sae, acts_RTD=acts,
                              thresholds_F=thr.thresholds_F, mask_RT=mask, tokenizer=tokenizer)


def judge_client(ctx: RunContext, role: str = "judge"):
    """The profile's judge or explainer (``role``), behind the run's on-disk request cache; each model is
    loaded once per process (one client when the explainer judges too)."""
    from metasae.autointerp.llm import make_client, model_label

    cfg = ctx.profile.autointerp
    keys = {r: (str(ctx.out), cfg.backend, model_label(cfg, r), cfg.base_url) for r in ("explainer", "judge")}
    if keys[role] not in _JUDGES:
        for old in [k for k in _JUDGES if k not in keys.values()]:  # only this profile's models stay in memory
            del _JUDGES[old]
        _JUDGES[keys[role]] = make_client(cfg, cache_dir=ctx.out / "llm_cache", role=role)
    return _JUDGES[keys[role]]


_JUDGES: dict[tuple[str, ...], Any] = {}


def judge_info(cfg: Any) -> dict[str, str]:
    """What a summary records of who explained and who judged."""
    from metasae.autointerp.llm import model_label

    return {"backend": cfg.backend, "model": model_label(cfg, "judge"), "explainer": model_label(cfg, "explainer")}


def judge_validation(ctx: RunContext, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    # ``seed`` draws the contexts; the set depends on the corpus and the judge, not on any SAE
    """Score the judge validation set (synthetic latents with known answers, on the autointerp
    split) with every scorer; write ``<out>/autointerp/validation_summary.json``."""
    from metasae.autointerp.run import count_failed
    from metasae.autointerp.validation import build_validation_contexts, score_validation, summarize_validation

    cfg = ctx.profile.autointerp
    cache = ensure_activations(ctx, progress=False)
    tokens, mask = cache.tokens("autointerp"), cache.mask("autointerp")
    contexts = build_validation_contexts(tokens.numpy(), mask.numpy(), cfg, seed, loaded_model(ctx).tokenizer,
                                         n_latents=cfg.n_validation_latents)
    vdir = ctx.out / "autointerp" / "validation"
    client = judge_client(ctx, "judge")  # the validation set's explanations are given: no explainer
    misses0, t0 = getattr(client, "misses", 0), time.perf_counter()
    records = score_validation(contexts, client, cfg, vdir, seed=seed, progress=progress)
    seconds, n_req = time.perf_counter() - t0, getattr(client, "misses", 0) - misses0
    speed = {"seconds": seconds, "n_requests": n_req, "loadavg": list(os.getloadavg()),
             "requests_per_s": n_req / seconds if n_req and seconds > 0 else None}
    summary_path = ctx.out / "autointerp" / "validation_summary.json"
    if not n_req and summary_path.is_file():  # every answer came from the run's cache (the harness's
        try:                                  # task scored the set before the notebook): keep its speed
            old = read_json(summary_path).get("speed") or {}
        except (OSError, ValueError, AttributeError):
            old = {}
        speed = old if old.get("n_requests") else speed
    out = {"judge": judge_info(cfg), "latents": list(contexts),
           "summary": summarize_validation(records), "n_failed": count_failed(records),
           # the judge's speed, measured on the requests really sent (not the cached ones)
           "speed": speed}
    atomic_write_json(summary_path, out)
    return {**out, "records": records}


def autointerp_seed(ctx: RunContext, seed: int, joint: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Explain and score a sample of matched (joint, solo) pairs; resumable (one file per latent)."""
    from metasae.autointerp.run import count_failed, score_latents, summarize_pairs, summarize_vs_random

    cfg = ctx.profile.autointerp
    t0 = time.perf_counter()
    joint = joint or selected_config(ctx, seed)
    match = matched_pairs(ctx, seed, joint)
    # like the paper's code, score only pairs whose latents both fire often enough on the autointerp
    # split to fill every context set (estimated from the phi split's firing rates, with a margin)
    from metasae.autointerp.contexts import requirement

    cache = ensure_activations(ctx, progress=False)
    T, W = ctx.profile.data.ctx_len, cfg.window
    need = 1.25 * 5 * max(requirement(cfg))
    expected = cache.n_valid("autointerp") * max(T - W + 1, 1) / T
    rj, rs = load_firing_rates(ctx, seed, joint), load_firing_rates(ctx, seed, "solo")
    eligible = np.nonzero(np.minimum(rj[match.idx_a], rs[match.idx_b]) * expected >= need)[0]
    rng = np.random.default_rng([seed, 17])
    n = min(cfg.n_pairs, len(eligible))
    n_emb = min(cfg.n_pairs_embedding, len(eligible) - n)  # then pairs for the embedding scorer alone
    drawn = rng.choice(eligible, size=n + n_emb, replace=False) if n + n_emb else np.array([], dtype=int)
    pick = np.concatenate([np.sort(drawn[:n]), np.sort(drawn[n:])]).astype(int)
    lj = [int(match.idx_a[i]) for i in pick]
    ls = [int(match.idx_b[i]) for i in pick]
    tokenizer = loaded_model(ctx).tokenizer
    ctx_j = _contexts_for(ctx, seed, joint, lj, cache, tokenizer)
    ctx_s = _contexts_for(ctx, seed, "solo", ls, cache, tokenizer)
    client, judge = judge_client(ctx, "explainer"), judge_client(ctx, "judge")
    clients = [client] if judge is client else [client, judge]

    def misses() -> int:
        return sum(getattr(c, "misses", 0) for c in clients)

    misses0 = misses()
    adir = paths.seed_dir(ctx.out, seed) / "autointerp"
    clock: dict[str, float] = {}  # seconds in the explainer's batches and in the scorers (score_latents)
    rec_j = score_latents(joint, lj, ctx_j, client, cfg, adir, seed=seed, progress=progress,
                          random_baseline=cfg.random_baseline_joint, embedding_only=lj[n:], judge=judge,
                          timings=clock)
    rec_s = score_latents("solo", ls, ctx_s, client, cfg, adir, seed=seed, progress=progress,
                          embedding_only=ls[n:], judge=judge, timings=clock)
    summary = summarize_pairs(rec_j, rec_s)
    out = {"joint": joint, "judge": judge_info(cfg),
           "n_matched_alive": len(match), "n_pairs_eligible": int(len(eligible)), "n_pairs_scored": n,
           "n_pairs_embedding_only": int(n_emb),
           "pairs": [{"joint": a, "solo": b, "cosine": float(match.cosine[i])} for a, b, i in zip(lj, ls, pick)],
           "records_joint": rec_j, "records_solo": rec_s, "summary": summary,
           "vs_random": {"solo": summarize_vs_random(rec_s), "joint": summarize_vs_random(rec_j)},
           "n_failed": count_failed(rec_j) + count_failed(rec_s),
           # contexts, explanations and scores of this call; requests really sent (not cached ones);
           # where the seconds went: the explainer, the scorers, and the rest (contexts, loading the models)
           "speed": {"seconds": (seconds := time.perf_counter() - t0), "n_requests": misses() - misses0,
                     "explain_s": clock["explain_s"], "n_explained": int(clock["n_explained"]),
                     "score_s": clock["score_s"], "other_s": seconds - clock["explain_s"] - clock["score_s"],
                     "loadavg": list(os.getloadavg())}}
    atomic_write_json(adir / "summary.json", {k: v for k, v in out.items() if not k.startswith("records")})
    return out


# ---------------------------------------------------------------------------
# Cross-phi and splitting
# ---------------------------------------------------------------------------


def cross_counts(ctx: RunContext, seed: int, a: str, b: str):
    """Exact co-firing counts between every latent of SAE `a` and of SAE `b` on the phi split (cached)."""
    from metasae.metrics.cooccurrence import CrossCounts, accumulate_counts

    path = metrics_dir(ctx, seed) / f"cross_{a}__{b}.npz"
    if path.is_file():
        return CrossCounts.load(path)
    trained = train_seed(ctx, seed, progress=False)
    cache = ensure_activations(ctx, progress=False)
    models = {nm: (trained[nm].sae, thresholds_for(ctx, seed, nm, trained[nm], cache)) for nm in (a, b)}
    counts = accumulate_counts(cache.valid_acts("phi", 16384), models, cross=[(a, b)])[(a, b)]
    counts.save(path)
    return counts


def dominant_tokens(ctx: RunContext, seed: int, name: str, tokenizer) -> tuple[list[str], np.ndarray]:
    """Each latent's most frequent firing token on the phi split and the fraction of its firings on it."""
    trained = train_seed(ctx, seed, progress=False)
    cache = ensure_activations(ctx, progress=False)
    thr = thresholds_for(ctx, seed, name, trained[name], cache)
    theta = torch.from_numpy(thr.thresholds_F.astype(np.float32))
    tokens, mask = cache.tokens("phi"), cache.mask("phi")
    tok_valid = tokens[mask].numpy().astype(np.int64)
    n = trained[name].sae.cfg.n_latents
    keys = []
    off = 0
    for x in cache.valid_acts("phi", 16384):
        t, f = (trained[name].sae.pre_acts(x) > theta).nonzero(as_tuple=True)
        keys.append(f.numpy().astype(np.int64) * (1 << 32) + tok_valid[off + t.numpy()])
        off += x.shape[0]
    uniq, cnt = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
    lat, tok = uniq >> 32, uniq & ((1 << 32) - 1)
    total = np.bincount(lat, weights=cnt, minlength=n)
    best_cnt = np.zeros(n)
    best_tok = np.full(n, -1, dtype=np.int64)
    order = np.lexsort((cnt, lat))  # by latent, then count ascending: the last per latent wins
    best_cnt[lat[order]] = cnt[order]
    best_tok[lat[order]] = tok[order]
    strings = [tokenizer.decode([int(t)]) if t >= 0 else "" for t in best_tok]
    fracs = np.where(total > 0, best_cnt / np.maximum(total, 1), 0.0)
    return strings, fracs
