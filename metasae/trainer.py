"""The joint trainer: one activation stream fans out to many SAEs.

The trainer never sees the language model.  It consumes an iterator of
activation batches (B x d tensors) — from the activation cache, from the
synthetic generator, or from random tensors in a test — and trains every
:class:`~metasae.config.RunSpec` on the same batches in the same order:

* ``solo``: BatchTopK SAE, loss = MSE + AuxK;
* ``joint``: the same primary (identical initialisation for the same seed) plus
  a meta SAE; macro-steps of ``n_p`` primary steps (meta frozen; the penalty
  lambda2 * mean_i exp(-||W_dec[i] - meta(W_dec)[i]||^2 / sigma2) recomputed
  at every step, meta output under no_grad) followed by ``n_m`` meta steps on
  the whole detached W_dec (SPEC section 1);
* ``ortho``: an OrtSAE-style decoder-cosine penalty, no meta SAE.

A joint run with lambda2 = 0 (the control) trains its primary exactly as the solo run of
the same seed does, so it shares the solo's primary (one set of primary steps; its meta SAE
trains on the shared rows, on the same schedule; its history and checkpoints are those an
independent control would have, bitwise: tested).

Resumable: every ``checkpoint_every_steps`` primary steps each run writes a
step folder and then ``trainer.json`` is replaced atomically; rerunning the
same call after a kill continues from the last commit and ends with weights
identical to an uninterrupted run (same data order, optimiser and generator
state restored; on CPU with the same thread count).

Data parallel under ``torchrun`` (``dist``, :mod:`metasae.distributed`): every rank
trains the same SAEs on its rows of each global batch, with BatchTopK over the
global batch and gradients averaged; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from metasae.allocator import keep_freed_memory
from metasae.checkpoint import (
    SAELENS_DIR,
    SAELENS_META_DIR,
    TRAINER_FILE,
    config_fingerprint,
    export_saelens,
    export_saelens_meta,
    load_optimizer_tensors,
    load_sae_tensors,
    pass_trainer_file,
    read_run_step,
    read_trainer,
    saelens_run_metadata,
    step_dirname,
    write_run_step,
)
from metasae.config import ConfigError, MetaConfig, RunSpec, SAEConfig, TrainConfig, primary_owner
from metasae.io import atomic_write_json
from metasae.sae import (BatchTopKSAE, decomposability_penalty, decomposability_penalty_grad_, meta_reconstruction,
                         orthogonality_penalty_grad_)

BatchSource = Callable[[int], Iterator[torch.Tensor]]
"""start_batch -> iterator over the remaining training batches (B x d)."""


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad batch); the message names run, stage and step."""


def meta_sae_config(sae: SAEConfig, meta: MetaConfig, n_latents: int | None = None) -> SAEConfig:
    """The meta SAE shares the primary's normalisation, AuxK and optimiser settings (paper code: cfg.copy())."""
    m = n_latents or meta.n_latents
    rows = meta.dead_after_rows or 5 * sae.n_latents
    return dataclasses.replace(sae, n_latents=m, k=meta.k, dead_after_tokens=rows, aux_k=min(sae.aux_k, m))


@dataclasses.dataclass
class RunState:
    spec: RunSpec
    primary: BatchTopKSAE
    opt: torch.optim.Optimizer
    meta: BatchTopKSAE | None = None
    meta_opt: torch.optim.Optimizer | None = None
    generator: torch.Generator | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_meta_mse: float | torch.Tensor = float("nan")
    """The last meta step's MSE (a scalar tensor while training: read only when recorded)."""
    calibration: dict[str, float] | None = None
    first_nonfinite: torch.Tensor | None = None
    """(primary step, meta step j or -1) of the first non-finite loss, (-1, -1) while none: kept
    on the device and read only at the checks (:meth:`FanOutTrainer._check_finite`)."""
    owner: "RunState | None" = None
    """The run whose primary (and its optimiser) this run shares (:func:`~metasae.config.primary_owner`:
    the lambda2 = 0 control shares the solo's); None: its own, stepped by the trainer."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a named cuda device must exist."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    device = torch.device(name)
    if device.type == "cuda":
        # fp32 GEMMs outside autocast (evaluation, the co-firing F^T F of 0/1 values, exact in TF32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _adam(params, cfg: SAEConfig) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over each parameter; CPU and CUDA)."""
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class FanOutTrainer:
    """Train several SAEs from one batch stream (see module docstring)."""

    def __init__(self, sae_cfg: SAEConfig, meta_cfg: MetaConfig, train_cfg: TrainConfig, runs: list[RunSpec],
                 ckpt_root: str | Path | None = None, progress: bool = True, desc: str = "train",
                 rebuild_hint: str = "", export_metadata: dict[str, Any] | None = None, dist: Any = None,
                 trainer_file: str = TRAINER_FILE):
        sae_cfg.validate("sae")
        train_cfg.validate("train")
        if not runs:
            raise ConfigError("runs must list at least one SAE to train")
        names = [r.name for r in runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"run names must be unique, got {names}")
        for r in runs:
            r.validate(f"run {r.name}")
            if r.kind == "joint":
                meta_cfg.validate(sae_cfg.n_latents)
                if r.meta_latents and r.meta_latents >= sae_cfg.n_latents:
                    raise ConfigError(f"run {r.name}: meta_latents ({r.meta_latents}) must be smaller than "
                                      f"sae.n_latents ({sae_cfg.n_latents})")
                if r.meta_latents and r.meta_latents <= meta_cfg.k:
                    raise ConfigError(f"run {r.name}: meta_latents ({r.meta_latents}) must be larger than "
                                      f"meta.k ({meta_cfg.k})")
        if train_cfg.batch_size * sae_cfg.k > train_cfg.batch_size * sae_cfg.n_latents:
            raise ConfigError("sae.k must be smaller than sae.n_latents")
        self.sae_cfg, self.meta_cfg, self.train_cfg, self.runs = sae_cfg, meta_cfg, train_cfg, runs
        self.ckpt_root = Path(ckpt_root) if ckpt_root else None
        self.progress, self.desc = progress, desc
        self._bad_batch: torch.Tensor | None = None
        self.trainer_file = trainer_file
        """The commit record's name in ``ckpt_root`` (a pass's own when a seed trains in passes)."""
        self.rebuild_hint = rebuild_hint or f"delete {self.ckpt_root} and rerun the training stage"
        """What an IntegrityError on resume tells the user to run (the pipeline passes its command)."""
        self.export_metadata = dict(export_metadata or {})
        """Model, hook, token stream and provenance for every SAELens export
        (:func:`~metasae.checkpoint.saelens_export_metadata`): plain values from the
        pipeline, so the trainer stays blind to the model.  Descriptive only, so not
        part of the fingerprint: a new git commit does not invalidate a resume."""
        self.autocast = train_cfg.autocast == "bfloat16"
        self.device = resolve_device(train_cfg.device)
        self.dist = dist if dist is not None and dist.world_size > 1 else None
        """Data parallelism (:mod:`metasae.distributed`): every batch is this rank's
        ``batch_size / world_size`` rows of the global batch; None: one process."""
        if self.dist is not None and train_cfg.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size ({train_cfg.batch_size}) must be a multiple of the number of "
                              f"processes ({self.dist.world_size}): it is the global batch")

    # -- construction -------------------------------------------------------
    def _fresh_state(self, spec: RunSpec) -> RunState:
        primary = BatchTopKSAE(self.sae_cfg, seed=spec.seed).to(self.device)
        primary.dist = self.dist  # the meta SAE reads the identical decoder on every rank: no collectives
        st = RunState(spec, primary, _adam(primary.parameters(), self.sae_cfg))
        if spec.kind == "joint":
            mcfg = meta_sae_config(self.sae_cfg, self.meta_cfg, spec.meta_latents or None)
            st.meta = BatchTopKSAE(mcfg, seed=spec.seed + 7919).to(self.device)
            st.meta_opt = _adam(st.meta.parameters(), mcfg)
        if spec.kind == "ortho":
            st.generator = torch.Generator().manual_seed(spec.seed + 104729)
        return st

    def fingerprint(self, n_steps: int) -> str:
        return config_fingerprint({
            "sae": dataclasses.asdict(self.sae_cfg), "meta": dataclasses.asdict(self.meta_cfg),
            "batch_size": self.train_cfg.batch_size, "autocast": self.train_cfg.autocast,
            "runs": [dataclasses.asdict(r) for r in self.runs], "n_steps": n_steps,
        })

    def _load_states(self, step: int) -> list[RunState]:
        assert self.ckpt_root is not None
        states = []
        hint = self.rebuild_hint
        for spec in self.runs:
            raw = read_run_step(self.ckpt_root / spec.name / step_dirname(step), hint)
            st = self._fresh_state(spec)
            load_sae_tensors(st.primary, raw["sae"])
            load_optimizer_tensors(st.opt, raw["state"], "primary_opt")
            if st.meta is not None:
                load_sae_tensors(st.meta, raw["meta"])
                load_optimizer_tensors(st.meta_opt, raw["state"], "meta_opt")
            if st.generator is not None:
                st.generator.set_state(raw["state"]["generator"])
            st.history = raw["history"]
            st.last_meta_mse = float(raw["cfg"].get("last_meta_mse", float("nan")))
            states.append(st)
        return self._link_shared(states)

    def _link_shared(self, states: list[RunState]) -> list[RunState]:
        """Point every run that shares a primary (:func:`~metasae.config.primary_owner`) at its
        owner's primary and optimiser (a resumed control's own saved copy equals them)."""
        by_name = {st.spec.name: st for st in states}
        for st in states:
            owner = primary_owner(st.spec, self.runs)
            if owner is not None:
                st.owner = by_name[owner.name]
                st.primary, st.opt = st.owner.primary, st.owner.opt
        return states

    def _commit(self, states: list[RunState], step: int, n_steps: int, complete: bool) -> None:
        if self.ckpt_root is None:
            return
        if self.dist is not None:  # rank 0 writes; the others wait until the commit is complete
            if self.dist.is_main:
                self._write_commit(states, step, n_steps, complete)
            self.dist.barrier()
            return
        self._write_commit(states, step, n_steps, complete)

    def _write_commit(self, states: list[RunState], step: int, n_steps: int, complete: bool) -> None:
        assert self.ckpt_root is not None
        for st in states:
            write_run_step(self.ckpt_root / st.spec.name, step, st.spec, st.primary, st.opt, st.meta, st.meta_opt,
                           st.generator, st.history, {"last_meta_mse": float(st.last_meta_mse),
                                                      "tokens": step * self.train_cfg.batch_size,
                                                      **({"threshold_calibration": st.calibration}
                                                         if st.calibration else {})},
                           with_optimizer=not complete)  # a completed run is never resumed
        if complete:  # exported before the final commit: a completed trainer.json implies complete exports
            for st in states:
                folder = self.ckpt_root / st.spec.name / SAELENS_DIR
                metadata = {**self.export_metadata,
                            **saelens_run_metadata(st.spec, step * self.train_cfg.batch_size, st.calibration)}
                export_saelens(st.primary, folder, metadata=metadata)
                if st.meta is not None:
                    export_saelens_meta(st.meta, folder / SAELENS_META_DIR, metadata)
        atomic_write_json(self.ckpt_root / self.trainer_file, {
            "step": step, "n_steps": n_steps, "complete": complete, "fingerprint": self.fingerprint(n_steps),
            "runs": [s.spec.name for s in states], "batch_size": self.train_cfg.batch_size,
            "tokens": step * self.train_cfg.batch_size,
        })
        # only now are other step folders garbage (also those a kill left between a commit and this cleanup)
        keep = step_dirname(step)
        for st in states:
            for old in (self.ckpt_root / st.spec.name).glob("step*"):
                if old.name != keep:
                    shutil.rmtree(old, ignore_errors=True)

    # -- the loop -----------------------------------------------------------
    def train(self, batches: BatchSource, n_steps: int, calib: Callable[[], Iterator[torch.Tensor]] | None = None,
              snapshot_steps: tuple[int, ...] = (), snapshot_runs: tuple[str, ...] = ()) -> list[RunState]:
        """Run `n_steps` primary steps (resuming from the last commit if any).

        ``calib``: held-out activation chunks; before the final commit every
        primary's inference threshold is set so that L0 = k on them
        (:meth:`BatchTopKSAE.calibrate_threshold`), replacing the training EMA.
        ``snapshot_steps``: after these primary steps the primaries of
        ``snapshot_runs`` are saved to ``<run>/snapshots/step<N>/`` (weights
        only; for metrics along training).
        """
        if n_steps <= 0:
            raise ConfigError(f"the training split yields no full batch of {self.train_cfg.batch_size} tokens")
        threads = torch_threads(self.train_cfg.threads)
        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory()  # no page faults for the tensors every step allocates again (metasae.allocator)
        start = 0
        states: list[RunState] | None = None
        if self.ckpt_root is not None:
            tr = read_trainer(self.ckpt_root, self.rebuild_hint, self.trainer_file)
            if tr is not None:
                if tr.get("fingerprint") != self.fingerprint(n_steps):
                    raise ConfigError(
                        f"{self.ckpt_root} holds checkpoints of a different configuration; "
                        "choose another output folder (--out) or delete that folder to retrain")
                start = int(tr["step"])
                states = self._load_states(start)
                if tr.get("complete"):
                    return states
        if states is None:
            states = self._link_shared([self._fresh_state(s) for s in self.runs])
        n_p, n_m = self.meta_cfg.n_primary_steps, self.meta_cfg.n_meta_steps
        every_ckpt, every_eval = self.train_cfg.checkpoint_every_steps, self.train_cfg.eval_every_steps
        B = self.train_cfg.batch_size
        t0, tokens_done = time.perf_counter(), 0
        share_norm = all(st.primary.cfg.input_norm == "standardize" for st in states)
        bar = tqdm(total=n_steps, initial=start, desc=self.desc, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        it = _on_device(batches(start), self.device)
        step = start
        self._bad_batch = None
        try:
            for step in range(start, n_steps):
                try:
                    x = next(it)
                except StopIteration:
                    raise TrainingError(f"the batch source ended at step {step} of {n_steps}") from None
                if x.ndim != 2 or x.shape[1] != self.sae_cfg.d_in:
                    raise TrainingError(f"batch at step {step} has shape {tuple(x.shape)}; "
                                        f"expected (batch, {self.sae_cfg.d_in}) to match sae.d_in")
                B_rank = B // self.dist.world_size if self.dist is not None else B
                if x.shape[0] != B_rank:
                    raise TrainingError(f"batch at step {step} has {x.shape[0]} rows; expected train.batch_size={B}"
                                        + (f" / {self.dist.world_size} processes" if self.dist is not None else ""))
                x = x.float()
                self._note_batch(x, step)  # checked with the losses, without a host sync per step
                x_norm = states[0].primary.standardize(x) if share_norm else None
                record = (step + 1) % every_eval == 0 or step + 1 == n_steps
                # a shared primary's penalty is read before its owner's step, as its own step would
                shared_pen = {st.spec.name: self._measured_penalty(st) for st in states
                              if st.owner is not None and record}
                for st in states:
                    if st.owner is None:
                        self._primary_step(st, x, x_norm, step, record)
                    elif record:  # the owner (listed before it) has stepped: its record is this run's
                        st.history.append({**st.owner.history[-1], "penalty": shared_pen[st.spec.name],
                                           "meta_mse": float(st.last_meta_mse)})
                    if st.meta is not None and (step + 1) % n_p == 0:
                        for j in range(n_m):
                            self._meta_step(st, step, j)
                tokens_done += B
                done = step + 1
                if record or done in snapshot_steps or (done % every_ckpt == 0 and done != n_steps):
                    self._check_finite(states)
                if record:
                    tok_s = tokens_done / max(time.perf_counter() - t0, 1e-9)
                    for st in states:
                        st.history[-1]["tokens_per_s"] = tok_s
                    bar.set_postfix(tok_s=f"{tok_s:,.0f}")
                bar.update(1)
                if done in snapshot_steps and self.ckpt_root is not None and (self.dist is None or self.dist.is_main):
                    for st in states:
                        if st.spec.name in snapshot_runs:
                            write_snapshot(self.ckpt_root / st.spec.name, done, st.primary)
                if done % every_ckpt == 0 and done != n_steps:
                    self._commit(states, done, n_steps, complete=False)
        finally:
            bar.close()
        self._check_finite(states)
        if calib is not None:
            for st in states:
                st.calibration = (st.owner.calibration if st.owner is not None
                                  else st.primary.calibrate_threshold(calib()))
        self._commit(states, n_steps, n_steps, complete=True)
        return states

    def _primary_step(self, st: RunState, x: torch.Tensor, x_norm, step: int, record: bool) -> None:
        """One primary step: :meth:`BatchTopKSAE.train_step` writes the gradient of MSE + AuxK,
        the run's decoder penalty adds its own to W_dec's, then the optimiser steps."""
        spec, sae = st.spec, st.primary
        out = sae.train_step(x, self.autocast, x_norm=x_norm)
        loss = out.loss
        pen_val = float("nan")
        if spec.kind == "joint" and st.meta is not None and spec.lambda2 > 0:
            W_hat = meta_reconstruction(st.meta, sae.W_dec_FD, self.autocast)
            pen = decomposability_penalty_grad_(sae.W_dec_FD, W_hat, spec.sigma2, spec.lambda2)
            loss = loss + spec.lambda2 * pen
            if record:  # read only when recorded: a read is a host sync on a GPU
                pen_val = float(pen)
        elif spec.kind == "joint" and record:  # the lambda2 = 0 control: measured, never in the loss
            pen_val = self._measured_penalty(st)
        elif spec.kind == "ortho":
            pen = orthogonality_penalty_grad_(sae.W_dec_FD, spec.ortho_coef, generator=st.generator)
            loss = loss + spec.ortho_coef * pen
            if record:
                pen_val = float(pen)
        self._note_finite(st, loss, step, -1)
        if self.dist is not None:  # the gradient of the global mean loss
            self.dist.all_reduce_mean_([p.grad for p in sae.parameters()])
        sae.remove_parallel_grad()
        st.opt.step()
        sae.normalize_decoder()
        if record:
            loss_v, mse_v, aux_v, l0_v = (float(loss.detach()), float(out.mse.detach()), float(out.aux.detach()),
                                          float(out.l0))
            if self.dist is not None:  # the history holds global means (equal shards: the mean of the ranks')
                vals = torch.tensor([loss_v, mse_v, aux_v, l0_v], dtype=torch.float64)
                self.dist.all_reduce_mean_([vals])
                loss_v, mse_v, aux_v, l0_v = (float(v) for v in vals)
            st.history.append({
                "step": step + 1, "tokens": (step + 1) * self.train_cfg.batch_size, "loss": loss_v,
                "mse": mse_v, "aux": aux_v, "l0": l0_v,
                "n_dead": out.n_dead, "threshold": float(sae.threshold), "penalty": pen_val,
                "meta_mse": float(st.last_meta_mse),
            })

    def _measured_penalty(self, st: RunState) -> float:
        """The decomposability penalty of a lambda2 = 0 run's rows: recorded, never in its loss."""
        if st.meta is None:
            return float("nan")
        W_hat = meta_reconstruction(st.meta, st.primary.W_dec_FD, self.autocast)
        return float(decomposability_penalty(st.primary.W_dec_FD.detach(), W_hat, st.spec.sigma2)[0])

    def _meta_step(self, st: RunState, step: int, j: int) -> None:
        meta = st.meta
        assert meta is not None and st.meta_opt is not None
        out = meta.train_step(st.primary.W_dec_FD.detach(), self.autocast)
        self._note_finite(st, out.loss, step, j)
        meta.remove_parallel_grad()
        st.meta_opt.step()
        meta.normalize_decoder()
        st.last_meta_mse = out.mse.detach()

    @staticmethod
    def _note_finite(st: RunState, loss: torch.Tensor, step: int, j: int) -> None:
        """Remember, on the device, the first step whose loss is not finite (no host sync)."""
        st.first_nonfinite = _first_nonfinite(st.first_nonfinite, loss.detach(), step, j)

    def _note_batch(self, x: torch.Tensor, step: int) -> None:
        """Remember, on the device, the first training batch holding a non-finite value."""
        self._bad_batch = _first_nonfinite(self._bad_batch, x, step)

    def _check_finite(self, states: list[RunState]) -> None:
        """Raise for the first non-finite training batch, else the first non-finite loss, noted
        since the start (one host sync each).  Called on recorded steps and before anything is
        written, so nothing non-finite is saved."""
        if self._bad_batch is not None and int(self._bad_batch[0]) >= 0:
            raise TrainingError(f"non-finite activations in the training batch at step {int(self._bad_batch[0])}")
        for st in states:
            if st.first_nonfinite is None:
                continue
            step, j = (int(v) for v in st.first_nonfinite.tolist())
            if step < 0:
                continue
            if j < 0:
                raise TrainingError(f"non-finite loss in run {st.spec.name} at primary step {step} (stage: training)")
            raise TrainingError(f"non-finite meta loss in run {st.spec.name} after primary step {step} "
                                f"(stage: meta step {j})")


def _first_nonfinite(first: torch.Tensor | None, t: torch.Tensor, *where: int) -> torch.Tensor:
    """``first`` (created as -1s, on t's device) set to ``where`` if it is still unset and `t`
    holds a non-finite value: all on the device, no host sync (Python scalars, not a tensor
    built from host data, whose copy would be a sync itself)."""
    if first is None:
        first = torch.full((len(where),), -1, dtype=torch.int64, device=t.device)
    bad = ~torch.isfinite(t).all() & (first[0] < 0)
    first.copy_(torch.stack([torch.where(bad, w, first[i]) for i, w in enumerate(where)]))
    return first


def _on_device(batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """The batches on `device`.  On a GPU each is copied from pinned memory without blocking,
    one batch ahead, so the copy of batch t + 1 overlaps step t; elsewhere as they come."""
    if device.type != "cuda":
        yield from batches
        return
    ahead = None
    for x in batches:
        x = x.to(device, non_blocking=True) if x.device.type != "cpu" else x.pin_memory().to(device, non_blocking=True)
        if ahead is not None:
            yield ahead
        ahead = x
    if ahead is not None:
        yield ahead


def train_in_passes(sae_cfg: SAEConfig, meta_cfg: MetaConfig, train_cfg: TrainConfig, passes: list[list[RunSpec]],
                    batches: BatchSource, n_steps: int, ckpt_root: str | Path,
                    calib: Callable[[], Iterator[torch.Tensor]] | None = None, snapshot_steps: tuple[int, ...] = (),
                    snapshot_runs: tuple[str, ...] = (), desc: str = "train", only: int | None = None,
                    **kw: Any) -> None:
    """Train every run of `passes`, one :class:`FanOutTrainer` per pass, each over the same
    batches in the same order (``batches(0)`` is read again for each pass).

    ``only``: train pass ``only`` alone and return (the passes of a seed in separate
    processes, side by side: each writes its own runs and its own commit record; the
    combined ``trainer.json`` is written by the call that finds every pass complete).

    One pass is the plain fan-out (its commit record is ``trainer.json``).  With several, each
    pass commits to its own record (:func:`~metasae.checkpoint.pass_trainer_file`) and resumes
    from it; ``trainer.json`` is written once all are complete, listing every run.  A run's
    computation reads only the batch and its own state, so its weights equal those of one pass
    with every run (tested bitwise)."""
    root, one = Path(ckpt_root), len(passes) == 1
    if only is not None and not 0 <= only < len(passes):
        raise ConfigError(f"training pass {only} does not exist: this seed trains in {len(passes)} pass(es)")
    fingerprints = []
    for i, runs in enumerate(passes):
        if only is not None and i != only:
            continue
        trainer = FanOutTrainer(sae_cfg, meta_cfg, train_cfg, runs, ckpt_root=root,
                                trainer_file=TRAINER_FILE if one else pass_trainer_file(i),
                                desc=desc if one else f"{desc}, pass {i + 1} of {len(passes)}", **kw)
        trainer.train(batches, n_steps, calib=calib, snapshot_steps=snapshot_steps, snapshot_runs=snapshot_runs)
        fingerprints.append(trainer.fingerprint(n_steps))
        dist = trainer.dist
        del trainer  # its states (weights, Adam moments) go before the next pass allocates its own
        if not one and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if one or only is not None:
        return
    if dist is None or dist.is_main:
        atomic_write_json(root / TRAINER_FILE, {
            "step": n_steps, "n_steps": n_steps, "complete": True,
            "fingerprint": config_fingerprint({"passes": fingerprints}),
            "runs": [r.name for runs in passes for r in runs], "batch_size": train_cfg.batch_size,
            "tokens": n_steps * train_cfg.batch_size, "passes": [pass_trainer_file(i) for i in range(len(passes))],
        })
    if dist is not None:
        dist.barrier()


def torch_threads(configured: int = 0) -> int:
    """Torch threads for this process: ``METASAE_THREADS`` (set by the harness when it runs
    seeds in parallel processes) wins over the profile's ``train.threads``; 0 = leave torch's default."""
    env = os.environ.get("METASAE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return int(configured or 0)


def write_snapshot(run_dir: Path, step: int, sae: BatchTopKSAE) -> Path:
    """Weights of a primary at `step` (``<run>/snapshots/step<N>/sae.safetensors``), written atomically."""
    from metasae.checkpoint import SAE_FILE, save_safetensors, sae_tensors

    folder = Path(run_dir) / "snapshots" / step_dirname(step)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(sae_tensors(sae), folder / SAE_FILE)
    atomic_write_json(folder / "snapshot.json", {"step": step})
    return folder


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
