"""Where things live on disk.

* ``data_root()``: shared, profile-independent artefacts (the offline corpus,
  converted model weights).  ``$METASAE_DATA`` or ``<repo>/data``.
* ``output_root(profile)``: everything one profile produces: the activation
  cache, per-seed checkpoints and metrics, tables, executed notebooks, the
  resolved config.  ``$METASAE_OUT`` or ``<repo>/outputs/<profile>``.
* ``figures_root(profile)``: ``<repo>/figures/<profile>``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_root() -> Path:
    return Path(os.environ.get("METASAE_DATA", REPO_ROOT / "data")).resolve()


def output_root(profile: str, out: str | Path | None = None) -> Path:
    if out:
        return Path(out).resolve()
    base = os.environ.get("METASAE_OUT")
    return (Path(base) if base else REPO_ROOT / "outputs" / profile).resolve()


def figures_root(profile: str, figures: str | Path | None = None) -> Path:
    if figures:
        return Path(figures).resolve()
    base = os.environ.get("METASAE_FIGURES")
    return (Path(base) if base else REPO_ROOT / "figures" / profile).resolve()


def activations_dir(out: Path) -> Path:
    return out / "activations"


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def checkpoint_dir(out: Path, seed: int, run_name: str) -> Path:
    return seed_dir(out, seed) / "checkpoints" / run_name


def tables_dir(out: Path) -> Path:
    return out / "tables"


def inside(path: str | Path, root: str | Path) -> Path:
    """Resolve `path` and refuse it unless it lies inside `root` (outputs never escape)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if p != r and r not in p.parents:
        raise ValueError(f"refusing to write {p}: it is outside the output folder {r}")
    return p
