"""What a profile will cost, before it runs: tokens, disk, memory and time per stage.

    bash run_all.sh --profile gpt2-large --plan
    python -m metasae.harness --profile gpt2-large --plan [--out DIR] [--jobs N]

:func:`estimate` turns a profile into one row per stage (harvest, train, evaluation and
|phi|, autointerp) with the tokens it processes, the disk it writes, the host memory and
GPU memory it needs at its peak, and, given a :class:`Calibration` measured on this
machine (:func:`calibrate`: a GEMM peak and a few SAE steps at the profile's shape), an
estimated time.  :func:`check` refuses a plan that the disk or the memory will not hold,
in one sentence naming the setting to change.  The harness runs the check (without the
calibration, which needs torch and a few seconds) before every real run, and prints the
whole plan with ``--plan``.

The figures are planning figures, not promises:

* disk: the activation cache holds every token of every cached split (``cache_dtype``
  values, plus 5 bytes of token id and mask per position of every split); a run folder
  holds per SAE its final weights, its SAELens export and its snapshots, and while a seed
  trains its in-progress checkpoints (weights and Adam's two moments, two copies while a
  new one is committed); the splitting notebook adds two cross co-firing count matrices
  (n x n, int32) for the first seed;
* host memory: the model's weights in its dtype plus a harvest batch (harvest), the
  trainer's estimate (:meth:`metasae.config.Profile.train_memory_bytes`, ``jobs`` seeds
  at once), a seed's SAEs, an evaluation batch and the co-firing counts of the SAEs that
  share a pass over the phi split (evaluation; the model too when a split is streamed);
* time: harvest FLOPs are 2 x (block parameters up to the hooked layer) per token (the
  embedding is a lookup, the rest of the model is not run) at 80% of the measured speed of
  a block-shaped GEMM in the model's dtype; a training step per SAE kind and an
  evaluation batch are timed at the profile's shape; seeds run ``jobs`` at a time on a CPU;
  a streamed calibration or phi split costs a harvest per pass over it.
  Autointerp depends on the judge's server and is not estimated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from metasae.config import Profile, RunSpec, _registry_spec, primary_owner

GiB = 2 ** 30
HARVEST_EFFICIENCY = 0.8
"""Fraction of the speed of a block-shaped GEMM that a harvest forward reaches (attention,
norms and host-device traffic are not GEMMs); a planning assumption, stated in the plan.
On the default profile (2-core CPU) the harvest ran at about 0.8 of it."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
MODEL_PARAMS = {"gpt2-large": 774_030_080, "gemma-2-9b": 9_241_705_984, "smollm2-135m": 134_515_008}
"""Published parameter counts (embeddings included); other models: 12 d^2 per block."""


class PlanError(RuntimeError):
    """The plan does not fit this machine; the message is one sentence for the user."""


@dataclass
class Calibration:
    """Speeds measured on this machine (seconds per call; FLOP/s)."""

    device: str
    gemm_flops: dict[str, float]
    """Measured FLOP/s of the encoder GEMM per dtype name ('float32', 'bfloat16'), with the
    threads of one training process."""
    harvest_flops: float
    """Measured FLOP/s of a block-like GEMM (harvest batch x d times d x 4d) in the model's
    dtype with every thread (the harvest runs alone)."""
    step_s: dict[str, float]
    """Seconds of one training step per SAE kind ('solo', 'joint', 'ortho') at the profile's shape
    (a joint step includes its share of the meta steps)."""
    eval_batch_s: float
    """Seconds of one evaluation pass over a training-size batch (one SAE)."""
    seconds: float = 0.0


@dataclass
class Stage:
    name: str
    tokens: int
    disk_bytes: int
    ram_bytes: int
    gpu_bytes: int
    seconds: float | None
    note: str = ""


@dataclass
class Plan:
    profile: str
    device: str
    stages: list[Stage] = field(default_factory=list)

    @property
    def disk_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.stages)

    @property
    def seconds(self) -> float | None:
        secs = [s.seconds for s in self.stages if s.seconds is not None]
        return sum(secs) if secs else None


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


def model_params(profile: Profile) -> tuple[int, int]:
    """(all parameters, block parameters run up to the hooked layer) of the profile's model.

    The second is what costs FLOPs while harvesting: the embedding is a lookup and the
    blocks from the hooked one on are not run."""
    spec = _registry_spec(profile.model.name)
    d = profile.sae.d_in
    n_layers = getattr(spec, "n_layers", None) or profile.model.layer + 1
    vocab = getattr(spec, "vocab_size", 0) or 50_000
    total = MODEL_PARAMS.get(profile.model.name) or (12 * d * d * n_layers + vocab * d)
    per_block = max(0, total - vocab * d) / n_layers
    return int(total), int(per_block * profile.model.layer)


def sae_bytes(n: int, d: int) -> int:
    """fp32 weights of one SAE (encoder, decoder, biases)."""
    return (2 * n * d + n + d) * 4


def cache_bytes(profile: Profile) -> tuple[int, int]:
    """(tokens harvested into it, bytes) of the activation cache: the values of every cached
    split plus token id and mask of every split (a streamed split keeps only those)."""
    dc = profile.data
    sizes = {"train": dc.train_tokens, "calib": dc.calib_tokens, "phi": dc.phi_tokens,
             "autointerp": dc.autointerp_tokens}
    cached = sum(n for s, n in sizes.items() if s not in dc.stream_splits)
    return cached, cached * profile.sae.d_in * DTYPE_BYTES[dc.cache_dtype] + 5 * sum(sizes.values())


def run_folder_bytes(profile: Profile, parallel: int = 1) -> int:
    """Checkpoints, exports, snapshots and cross-|phi| matrices of every seed (``parallel`` seeds
    training at once)."""
    return _checkpoint_bytes(profile, parallel) + _cross_bytes(profile)


def _checkpoint_bytes(profile: Profile, parallel: int = 1) -> int:
    """The run folders at their fullest: every SAE's final checkpoint (weights only: a completed run
    keeps no optimiser state), its SAELens export and the snapshots of solo and the replicated
    joint; and, for the ``parallel`` seeds that train at once, their in-progress checkpoints in
    place of their final ones (weights and Adam's two moments, two copies while a new step is
    committed: 6 weights per SAE instead of 2).  A seed that has not started holds nothing, so
    this bounds the peak from above."""
    n, d = profile.sae.n_latents, profile.sae.d_in
    final, extra = 0, []
    snap_runs = ("solo", profile.replicated_run)
    for seed in profile.seeds:
        more = 0
        for r in profile.runs_for_seed(seed):
            w = sae_bytes(n, d)
            if r.kind == "joint":
                w += sae_bytes(r.meta_latents or profile.meta.n_latents, d)
            final += w + w + (sae_bytes(n, d) * len(profile.train.snapshot_fractions) if r.name in snap_runs else 0)
            more += w * 6 - w * 2
        extra.append(more)
    return final + sum(sorted(extra, reverse=True)[:max(1, parallel)])


def _cross_bytes(profile: Profile) -> int:
    """The n x n int32 cross co-firing counts that notebook 04 (splitting) keeps for the first seed:
    the solo against the selected joint, and against the first independent solo when there is one."""
    n = profile.sae.n_latents
    return (1 + (profile.grid.independent_solos >= 1)) * n * n * 4


def phi_groups(sizes: dict[str, int], device: str, host_bytes: int | None, gpu_bytes: int | None) -> list[list[str]]:
    """SAEs (name -> n_latents) in groups whose co-firing counts fit in memory together, in order.

    Per SAE the packed pair counts take 2 n^2 bytes of host memory and, on a GPU, the dense
    int64 accumulator 8 n^2 bytes of its memory; a group may use half of each (the model and
    the SAEs need the rest).  Every SAE gets a group, alone where even one does not fit."""
    limits = [(2, host_bytes)] + ([(8, gpu_bytes)] if device.startswith("cuda") else [])
    groups: list[list[str]] = []
    used = [0] * len(limits)
    for nm, n in sizes.items():
        need = [per * n * n for per, _ in limits]
        fits = groups and all(lim is None or u + x <= lim // 2 for (_, lim), u, x in zip(limits, used, need))
        if not fits:
            groups.append([])
            used = [0] * len(limits)
        groups[-1].append(nm)
        used = [u + x for u, x in zip(used, need)]
    return groups


def _harvest_seconds(calib: Calibration | None, params_run: int, tokens: float) -> float | None:
    """Seconds to harvest ``tokens`` at HARVEST_EFFICIENCY of the calibration's harvest-shaped GEMM."""
    if calib is None or calib.harvest_flops <= 0:
        return None
    return 2.0 * params_run * tokens / (calib.harvest_flops * HARVEST_EFFICIENCY)


def _steps(profile: Profile) -> int:
    return math.floor(profile.data.train_tokens * profile.train.epochs / profile.train.batch_size)


# ---------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------


def estimate(profile: Profile, jobs: int = 1, calib: Calibration | None = None, device: str = "cpu",
             host_bytes: int | None = None, gpu_bytes: int | None = None) -> Plan:
    """One row per stage; times only with `calib`.  ``host_bytes`` and ``gpu_bytes`` (the memory
    available) size the groups of SAEs that share a pass over the phi split (one group when None)."""
    d, n, B = profile.sae.d_in, profile.sae.n_latents, profile.train.batch_size
    on_gpu = device.startswith("cuda")
    params, params_run = model_params(profile)
    weights = params * DTYPE_BYTES.get(profile.model.dtype, 4)
    tokens, cbytes = cache_bytes(profile)
    batch_tokens = profile.data.harvest_batch_rows * profile.data.ctx_len
    harvest_ram = (0 if on_gpu else weights) + batch_tokens * d * 4 * 4 + tokens * 5
    plan = Plan(profile.name, device)

    harvest_s = _harvest_seconds(calib, params_run, tokens)
    plan.stages.append(Stage("harvest (00_activations)", tokens, cbytes, harvest_ram,
                             weights + batch_tokens * d * 4 * 4 if on_gpu else 0, harvest_s,
                             f"{params_run / 1e6:,.0f}M parameters run per token, cache in {profile.data.cache_dtype}"
                             + (f"; not the streamed {', '.join(profile.data.stream_splits)} split"
                                + ("s" if len(profile.data.stream_splits) > 1 else "")
                                if profile.data.stream_splits else "")))

    steps = _steps(profile)
    kinds = [r.kind for s in profile.seeds for r in profile.runs_for_seed(s)]
    parallel = 1 if on_gpu else max(1, min(jobs, len(profile.seeds)))
    train_mem = profile.train_memory_bytes()  # of the largest pass
    n_passes = sum(len(profile.train_passes(s)) for s in profile.seeds)
    in_passes = n_passes > len(profile.seeds)  # some seed trains in more than one pass
    train_s = None
    streamed = "train" in profile.data.stream_splits
    if calib is not None:
        per_step_harvest = (_harvest_seconds(calib, params_run, B) or 0.0) if streamed else 0.0
        def step_s(r: RunSpec, runs: list[RunSpec]) -> float:
            t = calib.step_s.get(r.kind, calib.step_s["solo"])
            if primary_owner(r, runs) is not None:  # the control on its solo's primary: its meta SAE only
                t = max(t - calib.step_s["solo"], 0.0)
            return t

        per_seed = [(sum(step_s(r, profile.runs_for_seed(s)) for r in profile.runs_for_seed(s))
                     + per_step_harvest * len(profile.train_passes(s))) * steps for s in profile.seeds]
        train_s = _parallel_time(per_seed, parallel)
    # the mixing buffer (cache dtype), its shuffled copy and a refill
    buffer = profile.data.buffer_tokens * d * DTYPE_BYTES[profile.data.cache_dtype] * 3 if streamed else 0
    model_ram = weights if streamed and not on_gpu else 0
    train_ram = (train_mem + buffer + model_ram) * parallel if not on_gpu else 2 * GiB + buffer
    train_gpu = train_mem + (weights if streamed else 0) if on_gpu else 0
    plan.stages.append(Stage("train (01_train)", steps * B * len(kinds), _checkpoint_bytes(profile, parallel),
                             train_ram, train_gpu, train_s,
                             f"tokens counted once per SAE: {len(kinds)} SAEs over {len(profile.seeds)} seeds, "
                             f"{steps:,} steps of {B:,} tokens"
                             + (f"; at most {profile.train.runs_per_pass} SAEs at once ({n_passes} passes)"
                                if in_passes else "")
                             + ("; the training split is streamed (harvested again by every seed"
                                + (" and pass" if in_passes else "") + ")" if streamed else "")))

    dc = profile.data
    phi_tokens = dc.phi_tokens
    n_snaps = len(profile.train.snapshot_fractions) * 2  # solo and the replicated joint
    runs_max = max(len(profile.runs_for_seed(s)) for s in profile.seeds)
    # SAEs sharing one pass over the phi split: their co-firing counts at once (2 n^2 bytes each on
    # the host; on a GPU also the 8 n^2 dense accumulator); passes per seed for the runs and the snapshots
    groups = phi_groups({str(i): n for i in range(runs_max)}, device, host_bytes, gpu_bytes)
    per_group = max(len(g) for g in groups)
    phi_passes = len(groups) + (len(phi_groups({str(i): n for i in range(n_snaps)}, device, host_bytes, gpu_bytes))
                                if n_snaps else 0)
    calib_passes = 1 + (1 if n_snaps else 0)
    eval_s = None
    if calib is not None:
        batches = math.ceil(phi_tokens / B)
        harvest = _harvest_seconds(calib, params_run, (phi_passes * phi_tokens if "phi" in dc.stream_splits else 0)
                                   + (calib_passes * dc.calib_tokens if "calib" in dc.stream_splits else 0)) or 0.0
        per_seed = [(len(profile.runs_for_seed(s)) + n_snaps) * batches * calib.eval_batch_s + harvest
                    for s in profile.seeds]
        eval_s = _parallel_time(per_seed, parallel)
    streamed_eval = [x for x in ("calib", "phi") if x in dc.stream_splits]
    model_ram = weights if streamed_eval and not on_gpu else 0
    eval_ram = ((sae_bytes(n, d) * runs_max + B * n * 4 * 2 + 2 * n * n * per_group + model_ram)
                * (parallel if not on_gpu else 1))
    eval_gpu = (sae_bytes(n, d) * runs_max + B * n * 4 * 2 + 8 * n * n * per_group
                + (weights if streamed_eval else 0)) if on_gpu else 0
    note = (f"one encoder pass per SAE over the phi split, {per_group} SAE{'s' if per_group > 1 else ''} per pass "
            f"({phi_passes} pass{'es' if phi_passes > 1 else ''} per seed{' with the snapshots' if n_snaps else ''})")
    if streamed_eval:
        note += (f"; the streamed {' and '.join(streamed_eval)} split{'s' if len(streamed_eval) > 1 else ''} "
                 "harvested in each pass")
    plan.stages.append(Stage("evaluation and phi (02_cooccurrence)", phi_tokens * len(kinds), _cross_bytes(profile),
                             eval_ram, eval_gpu, eval_s, note + "; CE splices not included"))
    resident = "autointerp" in dc.stream_splits  # harvested once per process into memory
    ai_ram = weights + (dc.autointerp_tokens * d * DTYPE_BYTES[dc.cache_dtype] if resident else 0)
    plan.stages.append(Stage("autointerp (03_autointerp)", dc.autointerp_tokens, 0, ai_ram, 0, None,
                             f"{profile.autointerp.backend} judge: time depends on its server"
                             + ("; the streamed autointerp split harvested into memory" if resident else "")))
    return plan


def _parallel_time(per_seed: list[float], parallel: int) -> float:
    """Wall time of per-seed jobs run `parallel` at a time (longest first)."""
    lanes = [0.0] * parallel
    for t in sorted(per_seed, reverse=True):
        lanes[lanes.index(min(lanes))] += t
    return max(lanes)


def size_text(b: int) -> str:
    """Bytes as GiB (or MiB below a tenth of a GiB)."""
    return f"{b / GiB:,.1f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:,.1f} MiB"


def check(plan: Plan, free_disk: int | None, free_ram: int | None, gpu_bytes: int | None = None) -> None:
    """Refuse a plan the disk or the memory will not hold, in one sentence."""
    if free_disk is not None and plan.disk_bytes > free_disk:
        big = max(plan.stages, key=lambda s: s.disk_bytes)
        raise PlanError(f"profile {plan.profile!r} needs about {size_text(plan.disk_bytes)} of disk "
                        f"({big.name}: {size_text(big.disk_bytes)}) but {size_text(free_disk)} are free "
                        "in the output folder; lower the data.*_tokens or use another --out")
    for s in plan.stages:
        if free_ram is not None and s.ram_bytes > free_ram:
            raise PlanError(f"profile {plan.profile!r} needs about {size_text(s.ram_bytes)} of memory for "
                            f"{s.name} but {size_text(free_ram)} are available; lower sae.n_latents, "
                            "train.batch_size or the grid, or run with --jobs 1")
        if gpu_bytes is not None and s.gpu_bytes > gpu_bytes:
            raise PlanError(f"profile {plan.profile!r} needs about {size_text(s.gpu_bytes)} of GPU memory for "
                            f"{s.name} but the GPU has {size_text(gpu_bytes)}; lower sae.n_latents or "
                            "train.batch_size")


def render(plan: Plan, calib: Calibration | None = None) -> str:
    """The plan as a Markdown table, with the calibration it used."""
    def size(b: int) -> str:
        return "-" if not b else size_text(b)

    def dur(s: float | None) -> str:
        if s is None:
            return "not estimated"
        return f"{s / 3600:,.1f} h" if s >= 3600 else (f"{s / 60:,.1f} min" if s >= 60 else f"{s:,.0f} s")

    lines = [f"Plan for profile `{plan.profile}` on {plan.device}:", "",
             "| stage | tokens | disk | memory | GPU memory | time | notes |", "|---|---:|---:|---:|---:|---:|---|"]
    for s in plan.stages:
        lines.append(f"| {s.name} | {s.tokens:,} | {size(s.disk_bytes)} | {size(s.ram_bytes)} | {size(s.gpu_bytes)} "
                     f"| {dur(s.seconds)} | {s.note} |")
    lines.append(f"| total | | {size(plan.disk_bytes)} | | | {dur(plan.seconds)} | |")
    if calib is not None:
        peaks = ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in calib.gemm_flops.items())
        peaks += f"; harvest-shaped GEMM in the model's dtype {calib.harvest_flops / 1e9:,.0f} GFLOP/s"
        steps = ", ".join(f"{k} {v * 1000:,.0f} ms" for k, v in calib.step_s.items())
        lines += ["", f"Calibration on {calib.device} ({calib.seconds:.0f} s): GEMM peak {peaks}; one training step "
                      f"{steps}; one evaluation batch {calib.eval_batch_s * 1000:,.0f} ms.  The harvest is assumed to reach "
                      f"{HARVEST_EFFICIENCY:.0%} of the harvest-shaped GEMM's speed."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Calibration (torch)
# ---------------------------------------------------------------------------


def calibrate(profile: Profile, device: str = "cpu", steps: int = 3, threads: int = 0) -> Calibration:
    """Time the encoder GEMM and, after as many warm-up steps, `steps` training steps of each
    SAE kind at the profile's shape, with `threads` torch threads on a CPU (0: torch's
    default; the harness passes what each of its concurrent seed processes gets)."""
    import dataclasses

    import torch

    from metasae.config import RunSpec
    from metasae.trainer import FanOutTrainer

    t_start = time.perf_counter()
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def gemm_flops(rows: int, inner: int, cols: int, dt: torch.dtype) -> float:
        a = torch.randn(rows, inner, dtype=dt, device=dev)
        w = torch.randn(inner, cols, dtype=dt, device=dev)
        a @ w
        sync()
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            a @ w
            sync()
            best = min(best, time.perf_counter() - t)
        return 2 * rows * inner * cols / best

    B, d, n = profile.train.batch_size, profile.sae.d_in, profile.sae.n_latents
    model_dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[profile.model.dtype]
    harvest = gemm_flops(max(256, profile.data.harvest_batch_rows * profile.data.ctx_len), d, 4 * d, model_dt)
    if dev.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    flops = {name: gemm_flops(B, d, n, dt) for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}

    cfg = profile.sae
    meta = profile.meta
    train = dataclasses.replace(profile.train, eval_every_steps=10 ** 9, checkpoint_every_steps=10 ** 9,
                                device=device)
    specs = {"solo": RunSpec("solo", "solo", 0), "joint": RunSpec("joint", "joint", 0, 0.3, 1.0),
             "ortho": RunSpec("ortho", "ortho", 0, ortho_coef=0.1)}
    kinds = {r.kind for s in profile.seeds for r in profile.runs_for_seed(s)} | {"solo"}
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(profile.train.batch_size, cfg.d_in, generator=g) * 3).to(dev)
    step_s: dict[str, float] = {}
    eval_s = 0.0
    for kind in sorted(kinds):
        tr = FanOutTrainer(cfg, meta, train, [specs[kind]], progress=False)
        st = tr._fresh_state(tr.runs[0])
        for i in range(steps):  # warm-up: allocations, kernels, Adam's first steps
            tr._primary_step(st, x, None, i, False)
        sync()
        t = time.perf_counter()
        for i in range(steps):
            tr._primary_step(st, x, None, steps + i, False)
        sync()
        step_s[kind] = (time.perf_counter() - t) / steps
        if st.meta is not None:  # n_meta_steps meta steps every n_primary_steps primary steps
            t = time.perf_counter()
            for j in range(steps):
                tr._meta_step(st, steps, j)
            sync()
            step_s[kind] += (time.perf_counter() - t) / steps * meta.n_meta_steps / meta.n_primary_steps
        if kind == "solo":
            st.primary.evaluate_batch(x)
            sync()
            t = time.perf_counter()
            st.primary.evaluate_batch(x)
            sync()
            eval_s = time.perf_counter() - t
        del tr, st
    return Calibration(device, flops, harvest, step_s, eval_s, time.perf_counter() - t_start)


def resolve_device(profile: Profile) -> str:
    """The device a profile's training will use ('auto': CUDA when torch sees one)."""
    dev = profile.train.device
    if dev != "auto":
        return dev
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_memory_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
