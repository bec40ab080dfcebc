"""Atomic, checksummed file writes.

Every artefact is written to a temporary file in the same folder, flushed and
fsynced, then renamed over the target: a run that dies leaves either the old
file or the new one, never a file that looks complete but is not.  Also the one
place that installs Debian packages (:func:`apt_install`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence


class IntegrityError(RuntimeError):
    """A file is truncated, altered or missing; the message names it and how to rebuild it."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_file(path: str | Path, sha256: str, size: int | None, rebuild_hint: str) -> None:
    """Raise IntegrityError naming `path` and `rebuild_hint` if it does not match."""
    p = Path(path)
    if not p.is_file():
        raise IntegrityError(f"{p} is missing; rebuild it with: {rebuild_hint}")
    if size is not None and p.stat().st_size != size:
        raise IntegrityError(
            f"{p} is truncated or altered ({p.stat().st_size} bytes, expected {size}); rebuild it with: {rebuild_hint}")
    if sha256_file(p) != sha256:
        raise IntegrityError(f"{p} does not match its recorded checksum; rebuild it with: {rebuild_hint}")


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _json_default(o: Any) -> Any:
    import numpy as np  # local: keep import light

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def apt_install(packages: Sequence[str], need: str, error: type[Exception], alternative: str = "") -> None:
    """``apt-get update`` then ``apt-get install -y packages`` as root (the offline corpus's
    Debian packages, Chromium for the browser tests); anything that stops it raises `error`
    with one sentence: "<need> needs ...", followed by `alternative` when given."""
    names = " ".join(packages)
    tail = f"; {alternative}" if alternative else ""
    if shutil.which("apt-get") is None:
        raise error(f"{need} needs Debian's apt-get to install {names}{tail}")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise error(f"{need} needs `apt-get install -y {names}` as root; run it{tail}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:]
            raise error(f"`{' '.join(cmd)}` failed (exit {res.returncode}{': ' + last[0] if last else ''}){tail}")
