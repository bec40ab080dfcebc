"""Run the notebooks that regenerate the paper's tables and figures.

    python -m metasae.harness --profile default --seeds 0,1,2 [--out DIR]
        [--figures DIR] [--only NOTEBOOK] [--notebooks DIR] [--kernel NAME] [--check]

The notebooks (``notebooks/*.py``, jupytext percent format) are the source of
truth.  Each is converted with jupytext and executed with papermill in filename
order; a notebook whose first lines hold ``# metasae: per-seed`` runs once per
seed (parameter ``seed``), the others once (parameter ``seeds``, e.g. "0,1,2").
Every notebook also gets ``profile``, ``out_dir`` and ``figures_dir``.

Outputs: executed notebooks in ``<out>/notebooks/``, tables in
``<out>/tables/`` and figures in ``<figures>`` (both through
``metasae.report``), the resolved profile in ``<out>/config.json``, and, only
when every notebook succeeded, ``<out>/results.md`` (plus ``results.json``)
listing every table and figure with its profile, seeds and git commit.  A
failed run leaves no results file behind: nothing half-made is presented as
complete.

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
PER_SEED_MARKER = "# metasae: per-seed"
MARKER_LINES = 30
"""The per-seed marker counts when it is one of a notebook's first 30 lines."""
DEFAULT_KERNELS = ("metasae", "python3")
RESULTS_NAMES = ("results.md", "results.json")


class HarnessError(RuntimeError):
    """Bad input or a failed notebook; the message is one sentence for the user."""


@dataclass
class Notebook:
    path: Path
    per_seed: bool

    @property
    def name(self) -> str:
        return self.path.stem


@dataclass
class Execution:
    notebook: Notebook
    seed: int | None
    output: Path
    seconds: float = 0.0


@dataclass
class Plan:
    profile: Profile
    seeds: list[int]
    out: Path
    figures: Path
    notebooks: list[Notebook]
    only: bool
    kernel: str = ""
    executions: list[Execution] = field(default_factory=list)


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
    p.add_argument("--check", action="store_true",
                   help="validate the input, print the profile's corpus name and exit")
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
    return Plan(profile, list(profile.seeds), out, figures, notebooks, only=bool(args.only))


def _check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise HarnessError(f"cannot write to the {what} folder {folder}: {reason}") from None


def discover(folder: Path) -> list[Notebook]:
    """The notebooks in ``folder``: ``*.py`` not starting with '_' or '.', in filename order."""
    if not folder.is_dir():
        raise HarnessError(f"the notebooks folder {folder} does not exist")
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith(("_", ".")):
            continue
        head = path.read_text(encoding="utf-8").splitlines()[:MARKER_LINES]
        found.append(Notebook(path, any(line.strip() == PER_SEED_MARKER for line in head)))
    if not found:
        raise HarnessError(f"no notebooks (*.py) found in {folder}")
    return found


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
    out, nb_out = plan.out, plan.out / "notebooks"
    nb_out.mkdir(parents=True, exist_ok=True)
    for name in RESULTS_NAMES:  # a new run: nothing from an older one may look complete
        (out / name).unlink(missing_ok=True)
    index = out / "artifacts.jsonl"
    _reset_index(index, None if not plan.only else {nb.name for nb in plan.notebooks})
    atomic_write_text(out / "config.json", plan.profile.to_json() + "\n")

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
            for nb in plan.notebooks:
                src = Path(tmp) / f"{nb.name}.ipynb"
                notebook = jupytext.read(nb.path)
                if not any("parameters" in c.metadata.get("tags", []) for c in notebook.cells):
                    raise HarnessError(f"notebook {nb.path.name} has no cell tagged parameters "
                                       "(# %% tags=[\"parameters\"]); see notebooks/README.md")
                notebook.metadata["kernelspec"] = {"name": plan.kernel, "language": "python",
                                                   "display_name": f"Python ({plan.kernel})"}
                notebook.metadata.setdefault("language_info", {"name": "python"})
                nbformat.write(notebook, src)
                for seed in (plan.seeds if nb.per_seed else [None]):
                    _execute(plan, nb, seed, src, nb_out, seeds_text, papermill, nbformat)
    finally:
        os.environ.clear()
        os.environ.update(env_before)

    if plan.only:
        print(f"ran {', '.join(n.path.name for n in plan.notebooks)}; results.md is written by full runs only")
        return None
    return write_results(plan, index)


def _execute(plan: Plan, nb: Notebook, seed: int | None, src: Path, nb_out: Path,
             seeds_text: str, papermill: Any, nbformat: Any) -> None:
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
    os.environ["METASAE_NOTEBOOK"] = nb.name
    os.environ["METASAE_SEED"] = "" if seed is None else str(seed)
    print(f"[metasae] running {label} ...", flush=True)
    t0 = time.perf_counter()
    failure = ""
    try:
        papermill.execute_notebook(str(src), str(output), parameters=params, kernel_name=plan.kernel,
                                   language="python",
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"],
                                   cwd=str(paths.REPO_ROOT), progress_bar=False, log_output=False)
    except Exception as exc:  # papermill's cell error, a dead kernel, a timeout, ...
        failure = _one_line(exc)
    if not failure and output.is_file():
        failure = _error_output(nbformat.read(output, as_version=4))
    elif not failure:
        failure = "papermill wrote no executed notebook"
    seconds = time.perf_counter() - t0
    if failure:
        where = f"; its executed copy is {output}" if output.is_file() else ""
        raise HarnessError(f"notebook {label} failed after {seconds:.0f} s: {failure}{where}")
    plan.executions.append(Execution(nb, seed, output, seconds))
    print(f"[metasae] done {label} in {seconds:.1f} s", flush=True)


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


def _reset_index(index: Path, notebooks: set[str] | None) -> None:
    """Forget entries of the notebooks about to run (all of them for a full run)."""
    if notebooks is None or not index.is_file():
        index.unlink(missing_ok=True)
        return
    kept = [line for line in index.read_text().splitlines()
            if line.strip() and json.loads(line).get("notebook") not in notebooks]
    atomic_write_text(index, "".join(line + "\n" for line in kept))


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


def write_results(plan: Plan, index: Path) -> Path:
    from metasae.report import read_index

    entries = read_index(index)
    ran = {e.notebook.name for e in plan.executions}
    entries = [e for e in entries if e.get("notebook") in ran or not e.get("notebook")]
    for e in entries:
        missing = [p for p in e["paths"] if not Path(p).is_file()]
        if missing:
            raise HarnessError(f"{e['kind']} {e['name']} was recorded but {missing[0]} does not exist")
    commit, dirty = git_state()
    seeds_text = ",".join(str(s) for s in plan.seeds)
    dirty_text = {True: " (dirty: uncommitted changes)", False: " (clean)", None: ""}[dirty]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def rel(p: str | Path) -> str:
        return os.path.relpath(p, plan.out)

    lines = [
        f"# Results: profile `{plan.profile.name}`",
        "",
        f"- profile: `{plan.profile.name}` ({plan.profile.description or 'no description'})",
        f"- seeds: {seeds_text}",
        f"- git commit: `{commit}`{dirty_text}",
        f"- finished: {now}",
        f"- resolved config: [config.json]({rel(plan.out / 'config.json')})",
        f"- figures folder: `{plan.figures}`",
        "",
        "Every notebook below ran without an error output.",
        "",
        "## Notebooks",
        "",
        "| notebook | seed | seconds | executed copy |",
        "|---|---|---|---|",
    ]
    for ex in plan.executions:
        seed = "all" if ex.seed is None else str(ex.seed)
        lines.append(f"| {ex.notebook.path.name} | {seed} | {ex.seconds:.1f} | [{ex.output.name}]({rel(ex.output)}) |")
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
    atomic_write_json(plan.out / "results.json", {
        "profile": plan.profile.name,
        "seeds": plan.seeds,
        "commit": commit,
        "dirty": dirty,
        "finished": now,
        "notebooks": [{"notebook": ex.notebook.path.name, "seed": ex.seed, "seconds": round(ex.seconds, 3),
                       "executed": str(ex.output)} for ex in plan.executions],
        "artifacts": entries,
    })
    results = plan.out / "results.md"
    atomic_write_text(results, "\n".join(lines) + "\n")
    return results


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
    return 0


if __name__ == "__main__":
    sys.exit(main(prog=os.environ.get("METASAE_PROG", "python -m metasae.harness")))
