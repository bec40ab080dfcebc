"""Saving the paper's tables and figures, and recording each one for results.md.

Notebooks call two functions and nothing else from here:

* ``save_figure(fig, name, figures_dir, caption="")`` writes ``<name>.png`` and
  ``<name>.pdf`` into ``figures_dir``;
* ``save_table(rows_or_dataframe, name, out_dir, caption="")`` writes
  ``<name>.csv`` and ``<name>.md`` into ``<out_dir>/tables/``.

Both write atomically (``metasae.io``) and append an entry (name, kind, paths,
caption, producing notebook, seed(s)) to the artefact index that
``metasae.harness`` turns into ``results.md``.  Under the harness the index is
``$METASAE_ARTIFACT_INDEX`` and the notebook / seed come from
``$METASAE_NOTEBOOK``, ``$METASAE_SEED`` and ``$METASAE_SEEDS``; run by hand, a
table is indexed in ``<out_dir>/artifacts.jsonl`` and a figure in
``<figures_dir>/artifacts.jsonl``.

pandas is optional: a table is a DataFrame, a list of dicts, or a list of
sequences with ``columns=``.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from metasae.io import atomic_path, atomic_write_text

INDEX_ENV = "METASAE_ARTIFACT_INDEX"
NOTEBOOK_ENV = "METASAE_NOTEBOOK"
SEED_ENV = "METASAE_SEED"
SEEDS_ENV = "METASAE_SEEDS"
PROFILE_ENV = "METASAE_PROFILE"
INDEX_NAME = "artifacts.jsonl"

PNG_METADATA: Mapping[str, None] = {"Software": None}
"""PNG text chunks to drop (None removes matplotlib's default entry)."""
PDF_METADATA: Mapping[str, None] = {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}
"""PDF info entries to drop: each would carry a version or the time of saving."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def save_figure(fig: Any, name: str, figures_dir: str | Path, caption: str = "", *,
                dpi: int = 150, index: str | Path | None = None) -> list[Path]:
    """Write ``fig`` (a matplotlib Figure) as PNG and PDF; return the two paths.

    The bytes depend only on what is drawn: the PNG carries no text chunk
    (matplotlib's default ``Software`` entry is removed) and the PDF no info
    entry that changes between runs or versions (``Creator``, ``Producer``,
    ``CreationDate``, ``ModDate``; ``SOURCE_DATE_EPOCH`` is then irrelevant).
    matplotlib's PDF writer adds no file ``/ID``, names font subsets from a
    hash of glyph indices (integers, which Python does not salt), and
    ``svg.hashsalt`` only concerns SVG, which is not written here.  The same
    figure therefore gives byte-identical files in any process
    (``tests/test_report_determinism.py``).
    """
    _check_name(name)
    figures_dir = Path(figures_dir)
    paths = [figures_dir / f"{name}.png", figures_dir / f"{name}.pdf"]
    with atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata=dict(PNG_METADATA))
    with atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, format="pdf", bbox_inches="tight", metadata=dict(PDF_METADATA))
    _record("figure", name, paths, caption, index or _default_index(figures_dir))
    return paths


def save_table(rows_or_dataframe: Any, name: str, out_dir: str | Path, caption: str = "", *,
               columns: Sequence[str] | None = None, float_digits: int = 4,
               index: str | Path | None = None) -> list[Path]:
    """Write a table as ``<out_dir>/tables/<name>.csv`` (full precision) and
    ``<name>.md`` (floats to ``float_digits`` significant digits, caption on top);
    return the two paths."""
    _check_name(name)
    cols, rows = table_rows(rows_or_dataframe, columns)
    tables = Path(out_dir) / "tables"
    paths = [tables / f"{name}.csv", tables / f"{name}.md"]
    atomic_write_text(paths[0], _to_csv(cols, rows))
    atomic_write_text(paths[1], _to_markdown(cols, rows, caption, float_digits))
    _record("table", name, paths, caption, index or _default_index(Path(out_dir)))
    return paths


def read_index(path: str | Path) -> list[dict[str, Any]]:
    """Entries of an artefact index, the latest entry per (kind, name) in first-seen order."""
    path = Path(path)
    if not path.is_file():
        return []
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            entries[(e["kind"], e["name"])] = e
    return list(entries.values())


def table_rows(data: Any, columns: Sequence[str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """Normalise a DataFrame / list of dicts / list of sequences to (columns, rows)."""
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas DataFrame, duck-typed
        df = data
        idx = getattr(df, "index", None)
        # a named index is data (e.g. set_index("run")); an unnamed one is row numbering
        if idx is not None and any(n is not None for n in idx.names):
            df = df.reset_index()
        cols = [str(c) for c in df.columns]
        rows = [list(r) for r in df.itertuples(index=False, name=None)]
        return cols, rows
    if isinstance(data, Mapping):  # dict of columns
        cols = [str(c) for c in data]
        values = [list(v) for v in data.values()]
        n = len(values[0]) if values else 0
        if any(len(v) != n for v in values):
            raise ValueError("save_table: every column of a dict table must have the same length")
        return cols, [[v[i] for v in values] for i in range(n)]
    rows_in = list(data) if isinstance(data, Iterable) else None
    if rows_in is None:
        raise TypeError(f"save_table needs a DataFrame, a list of dicts or a list of rows, not {type(data).__name__}")
    if rows_in and all(isinstance(r, Mapping) for r in rows_in):
        keys: list[Any] = list(columns) if columns else []
        for r in rows_in:
            for k in r:
                if k not in keys:
                    keys.append(k)
        return [str(k) for k in keys], [[r.get(k) for k in keys] for r in rows_in]
    if columns is None:
        raise ValueError("save_table: a list of rows needs columns=[...]")
    cols = [str(c) for c in columns]
    rows = [list(r) for r in rows_in]
    if any(len(r) != len(cols) for r in rows):
        raise ValueError(f"save_table: every row must have {len(cols)} values ({', '.join(cols)})")
    return cols, rows


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"artefact name {name!r} must be a file-name stem of letters, digits, '_', '-', '.' or '+'")


def _default_index(folder: Path) -> Path:
    env = os.environ.get(INDEX_ENV)
    return Path(env) if env else folder / INDEX_NAME


def _record(kind: str, name: str, paths: list[Path], caption: str, index: str | Path) -> None:
    seed = os.environ.get(SEED_ENV, "")
    seeds = os.environ.get(SEEDS_ENV, "")
    entry = {
        "kind": kind,
        "name": name,
        "paths": [str(p.resolve()) for p in paths],
        "caption": caption,
        "notebook": os.environ.get(NOTEBOOK_ENV, ""),
        "profile": os.environ.get(PROFILE_ENV, ""),
        "seed": int(seed) if seed.isdigit() else None,
        "seeds": [int(s) for s in seeds.split(",") if s.strip().isdigit()],
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    index = Path(index)
    old = index.read_text() if index.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(index, old + json.dumps(entry, sort_keys=True) + "\n")


def _to_csv(cols: list[str], rows: list[list[Any]]) -> str:
    buf = _io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_cell(v) for v in r])
    return buf.getvalue()


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if hasattr(v, "item") and callable(v.item):  # numpy scalar
        try:
            v = v.item()
        except (ValueError, TypeError):
            pass
    if isinstance(v, float):
        return repr(v)
    return v


def _md_cell(v: Any, digits: int) -> str:
    if v is None:
        return ""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, TypeError):
            pass
    if isinstance(v, bool):
        s = str(v)
    elif isinstance(v, float):
        s = "nan" if math.isnan(v) else f"{v:.{digits}g}"
    else:
        s = str(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _to_markdown(cols: list[str], rows: list[list[Any]], caption: str, digits: int) -> str:
    lines = []
    if caption:
        lines += [caption.strip(), ""]
    lines.append("| " + " | ".join(_md_cell(c, digits) for c in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_md_cell(v, digits) for v in r) + " |")
    return "\n".join(lines) + "\n"
