"""Every command the README shows works as written.

The README's bash blocks are read from README.md itself, so a command edited there is
tested as edited.  ``bash run_all.sh ...`` lines are validated as run_all.sh validates
them before any work (``python -m metasae.harness --check`` with the same arguments);
``bash run_tests.sh`` lines are this suite.  Every other block is run as written, in a
copy of the working tree (the environment and data folders linked in), by the slow test;
those blocks assume what their README text says was done before (``.venv`` set up, the
corpus built), and must not run ``run_all.sh``: its setup would re-point the shared
environment's editable install at the copy.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bash_blocks(text: str) -> list[str]:
    """The ```bash fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """The commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            out.append(line)
    return out


BLOCKS = bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
RUN_ALL = [c for b in BLOCKS for c in commands(b) if c.startswith("bash run_all.sh")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("METASAE_OUT", "METASAE_FIGURES")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env


def test_the_readme_shows_commands() -> None:
    assert len(BLOCKS) >= 3 and RUN_ALL
    assert commands("a \\\n  b  # c\n# only a comment\n\nd\n") == ["a    b", "d"]


@pytest.mark.parametrize("command", RUN_ALL)
def test_run_all_lines_validate(command: str, tmp_path: Path) -> None:
    """What run_all.sh checks first, before setup or work: profile, seeds, folders, --only."""
    args = shlex.split(command)[2:]
    work = tmp_path / "tree"  # relative --out / --figures land here, not in the checkout
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", _CHECK_WITH_ROOM, "--check",
                           "--notebooks", str(ROOT / "notebooks"), *args],
                          cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{command!r} is refused: {proc.stderr.strip()}"


# The free disk is this machine's, not the command's: a test machine whose temporary folder
# holds less than the default profile writes (~2.3 GiB) would refuse every line for a reason
# the README cannot fix (tests/test_plan.py tests that refusal).  The harness runs as
# run_all.sh runs it, with only its disk probe answering "plenty".
_CHECK_WITH_ROOM = """
import sys
from metasae import harness
harness._free_disk = lambda folder: 1 << 50
sys.argv[0] = "metasae.harness"
sys.exit(harness.main(prog="run_all.sh"))
"""


def _tree_copy(dest: Path) -> None:
    """The working tree (tracked and untracked, not ignored files) with .venv and data/ linked."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / ".venv").symlink_to(Path(sys.prefix) if sys.prefix != sys.base_prefix else ROOT / ".venv")
    data = Path(os.environ.get("METASAE_DATA") or ROOT / "data")
    if data.exists():
        (dest / "data").symlink_to(data)


@pytest.mark.slow
def test_other_readme_blocks_run_as_written(tmp_path: Path) -> None:
    runnable = [b for b in BLOCKS if not all(c.startswith(("bash run_all.sh", "bash run_tests.sh"))
                                             for c in commands(b))]
    assert runnable, "the README shows no command beyond run_all.sh / run_tests.sh"
    assert not any(c.startswith("bash run_all.sh") for b in runnable for c in commands(b)), \
        "a README block mixes run_all.sh with other commands; keep run_all.sh lines in their own block"
    # what the README says was done before: the environment (this one) and the smoke corpus
    from metasae.config import load_profile

    corpus = load_profile("smoke").data.corpus
    subprocess.run([sys.executable, "-m", "metasae.activations.corpus", "--ensure", corpus], cwd=ROOT, env=_env(),
                   check=True, capture_output=True, timeout=1800)
    tree = tmp_path / "tree"
    tree.mkdir()
    _tree_copy(tree)
    env = _env()
    env["PYTHONPATH"] = str(tree)
    for block in runnable:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=1800)
        assert proc.returncode == 0, f"README block failed:\n{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # the block's seed-3 run landed where the README says, beside nothing else of the complete run
    assert (tree / "outputs" / "smoke" / "notebooks" / "01_train.seed3.ipynb").is_file()
