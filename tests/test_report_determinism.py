"""metasae.report.save_figure writes byte-identical PNG and PDF files for the same
figure, within one process and across processes (whatever PYTHONHASHSEED is)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Text (with non-ASCII glyphs), mathtext, a legend, an image and a colour bar:
# everything the notebooks draw.  Saved once with Type 3 and once with Type 42
# PDF fonts (the latter names font subsets from a hash).
DRAW = r'''
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from metasae.report import save_figure

def draw():
    fig, (a, b) = plt.subplots(1, 2, figsize=(6, 3))
    a.plot([0, 1, 2], [1, 3, 2], label="solo")
    a.plot([0, 1, 2], [2, 1, 0.5], label=r"joint $\lambda_2 = 0.3$")
    a.set_title("Δ mean |φ| (%)")
    a.legend()
    im = b.imshow(np.arange(20, dtype=float).reshape(4, 5))
    fig.colorbar(im, ax=b)
    return fig

def save_all(folder, index):
    written = []
    for fonttype in (3, 42):
        with matplotlib.rc_context({"pdf.fonttype": fonttype}):
            fig = draw()
            written += save_figure(fig, f"fig_t{fonttype}", folder, caption="c", index=index)
            plt.close(fig)
    return written

if __name__ == "__main__":
    save_all(sys.argv[1], sys.argv[2])
'''


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix in (".png", ".pdf")}


def test_same_figure_twice_in_one_process(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    namespace: dict = {"__name__": "draw_module"}
    exec(DRAW, namespace)  # noqa: S102  (the drawing code above, shared with the subprocess test)
    first = namespace["save_all"](tmp_path / "a", tmp_path / "a.jsonl")
    second = namespace["save_all"](tmp_path / "b", tmp_path / "b.jsonl")
    assert [p.name for p in first] == ["fig_t3.png", "fig_t3.pdf", "fig_t42.png", "fig_t42.pdf"]
    for p, q in zip(first, second):
        assert p.read_bytes() == q.read_bytes(), f"{p.name} differs between two saves"
    pdf = first[1].read_bytes()
    assert pdf.startswith(b"%PDF")
    for volatile in (b"/CreationDate", b"/ModDate", b"/Producer", b"/Creator", b"Matplotlib"):
        assert volatile not in pdf
    assert b"Software" not in first[0].read_bytes() and b"tEXt" not in first[0].read_bytes()


def test_same_figure_in_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    script = tmp_path / "draw.py"
    script.write_text(DRAW)
    digests = []
    for i, hashseed in enumerate(("1", "2")):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONHASHSEED"] = hashseed  # str hashes differ between the two processes
        env.pop("SOURCE_DATE_EPOCH", None)
        folder = tmp_path / f"run{i}"
        subprocess.run([sys.executable, str(script), str(folder), str(tmp_path / f"run{i}.jsonl")],
                       cwd=tmp_path, env=env, check=True, timeout=300, capture_output=True)
        digests.append(_digests(folder))
    assert len(digests[0]) == 4
    assert digests[0] == digests[1]
