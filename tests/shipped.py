"""The profiles this repository ships: the ones git tracks under profiles/.

A user's own ``profiles/*.toml`` beside them (a draft, a copy under edit) is not the test
suite's business: tests that check every shipped profile use this list, not the folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shipped_profiles() -> list[str]:
    """Names of the git-tracked profiles; every available profile outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "profiles/*.toml"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        listed = []
    if listed:
        return sorted(Path(f).stem for f in listed)
    from metasae.config import available_profiles

    return available_profiles()
