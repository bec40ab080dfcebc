"""The static feature browser (metasae.browser): data -> HTML, a fake run folder, a real headless Chromium.

The site is built from plain data (no model, no run), so these tests are fast;
the Chromium tests check that the inline JS runs from file:// without a console
error and that the pages draw.  They install Debian's ``chromium`` when absent
(as CI does) and are skipped, with the reason, only where apt-get is missing.
"""

from __future__ import annotations

import json
import shutil
import struct
import types
from pathlib import Path

import numpy as np
import pytest

from metasae import browser as B
from metasae.autointerp.contexts import TokenStrings, collect_firings

EVIL = "<script>alert(1)</script>"


def _ctx(tokens, acts):
    return B.Context(tokens=list(tokens), acts=[float(a) for a in acts], activation=float(acts[-1]))


def _view(sae: str, latent: int, scored: bool = True) -> B.LatentView:
    top = [_ctx(["The", " cat", EVIL, "\n", " sat"], [0, 0.5, 0, 0, 2.0]),
           _ctx(["a", " b", " & c"], [0, 0, 1.0])]
    v = B.LatentView(sae=sae, latent=latent, top=top, quantiles=[("Quintile 2", [_ctx(["x", "y"], [0, 0.3])])],
                     hist_counts=[1, 3, 0, 2], hist_edges=[0.1, 0.5, 0.9, 1.3, 1.7], n_firings=6, firing_rate=0.01)
    if scored:
        B.apply_record(v, {"explanation": f"fires on cats {EVIL}", "scores": {"fuzz": 0.75, "simulation": None},
                           "random_scores": {"fuzz": 0.5}, "random_explanation": "random <b>",
                           "judge": {"backend": "fake", "model": "m"}, "skip_reason": ""})
    return v


def _site(tmp_path: Path, n_pairs: int = 4) -> Path:
    pairs = [B.PairView(0, _view("joint_l0.3_s1", 10 + i), _view("solo", 20 + i, scored=i % 2 == 0), 0.5 + 0.1 * i)
             for i in range(n_pairs)]
    splits = [B.SplitView(0, _view("solo", 7), [_view("joint_l0.3_s1", 8), _view("joint_l0.3_s1", 9, scored=False)],
                          phi=[0.9, None], cosine=[0.3, 0.2], child_cosine=[[1.0, -0.2], [-0.2, 1.0]],
                          dominant_token=EVIL)]
    return B.write_site(tmp_path / "browser", pairs, splits, title="test")


# ---------------------------------------------------------------------------
# HTML from data
# ---------------------------------------------------------------------------


def test_site_pages_and_escaping(tmp_path):
    index = _site(tmp_path)
    pages = sorted((index.parent / "pages").glob("*.html"))
    assert len(pages) == 5
    for p in [index, *pages]:
        text = p.read_text(encoding="utf-8")
        assert EVIL not in text, p.name
        # the only script element is the index's own inline JS
        assert text.count("<script") == (1 if p == index else 0), p.name
        assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
    page = (index.parent / "pages" / "split_seed0_solo_7.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'title="2.000"' in page and "<svg" in page  # hover values and the histogram
    assert B.MISSING in page and "n/a" in page  # an unscored child; a scorer that gave no score
    assert "cross-phi to parent" in page and "0.900" in page


def test_rebuild_removes_stale_pages(tmp_path):
    _site(tmp_path, n_pairs=4)
    index = _site(tmp_path, n_pairs=2)
    assert len(list((index.parent / "pages").glob("pair_*.html"))) == 2


def test_context_shading_and_histogram():
    html = B.context_html(_ctx(["a", "<b>", "c"], [0, 1.0, 4.0]), scale=4.0)
    assert "&lt;b&gt;" in html and "rgba(255,120,0,0.25)" in html and "rgba(255,120,0,1.00)" in html
    assert B.MISSING in B.histogram_svg([], [])
    svg = B.histogram_svg([0, 5], [0.0, 1.0, 2.0])
    assert svg.count("<rect") == 2 and "n = 5" in svg


# ---------------------------------------------------------------------------
# Reading a run folder
# ---------------------------------------------------------------------------


def test_readers_on_a_fake_run(tmp_path):
    out = tmp_path / "run"
    (out / "seed0" / "autointerp" / "solo").mkdir(parents=True)
    (out / "tables").mkdir()
    assert B.read_pairs(out, 0) is None and B.read_splits(out, 0) is None
    (out / "tables" / "autointerp_pairs_seed0.csv").write_text("joint_latent,solo_latent,cosine\n6,1785,0.3\n")
    assert B.read_pairs(out, 0) == [{"joint": 6, "solo": 1785, "cosine": 0.3}]
    (out / "seed0" / "autointerp" / "summary.json").write_text(json.dumps({"pairs": [{"joint": 1, "solo": 2}]}))
    assert B.read_pairs(out, 0) == [{"joint": 1, "solo": 2, "cosine": None}]
    (out / "tables" / "splitting_candidates_seed0.csv").write_text(
        'parent,rate,dominant_token,children\n5,0.01, x,"3 (0.9), 4 (0.8)"\n6,0.01,y,"3 (0.9)"\n')
    assert B.read_splits(out, 0) == [{"parent": 5, "dominant_token": " x", "children": [3, 4], "joint": None}]
    (out / "tables" / "splitting_cases_seed0.csv").write_text(
        "parent,dominant_token,sae,latent\n5, x,solo,5\n5, x,joint_a,3\n5, x,joint_a,4\n")
    assert B.read_splits(out, 0) == [{"parent": 5, "dominant_token": " x", "children": [3, 4], "joint": "joint_a"}]
    rec = {"explanation": "e", "scores": {"fuzz": 0.6}, "random_scores": {"fuzz": 0.5}, "judge": {"model": "m"}}
    (out / "seed0" / "autointerp" / "solo" / "latent_000002.json").write_text(json.dumps(rec))
    v = B.apply_record(B.LatentView("solo", 2), B.read_autointerp(out / "seed0" / "autointerp" / "solo", 2))
    assert (v.explanation, v.scores, v.random_scores, v.judge) == ("e", {"fuzz": 0.6}, {"fuzz": 0.5}, "m")
    assert B.read_autointerp(out / "seed0" / "autointerp" / "solo", 3) is None


class _FakeSAE:
    """pre_acts = relu(x @ W): enough of an SAE for the context machinery."""

    def __init__(self, W):
        import torch

        self.W = torch.as_tensor(W, dtype=torch.float32)
        self.cfg = types.SimpleNamespace(n_latents=self.W.shape[1])

    def pre_acts(self, x):
        return (x.float() @ self.W).clamp_min(0)


def test_latent_windows_top_quintiles_hist():
    import torch

    rng = np.random.default_rng(0)
    R, T, D, W = 12, 16, 4, 4
    acts = torch.from_numpy(rng.normal(size=(R, T, D)).astype(np.float32))
    tokens = rng.integers(0, 50, size=(R, T))
    mask = np.ones((R, T), bool)
    sae = _FakeSAE(np.eye(D)[:, :2])
    fir = collect_firings(sae, np.array([0.2, 0.2]), acts, mask, latents=[0])
    w = B.latent_windows(fir, 0, tokens, sae=sae, acts_RTD=acts, theta=0.2, mask_RT=mask, window=W,
                         strings=TokenStrings(table={i: f"t{i}" for i in range(50)}), rng=np.random.default_rng(1),
                         n_top=5, n_per_quintile=2)
    rows, pos, vals = fir.of(0)
    elig = vals[pos >= W - 1]
    assert [c.activation for c in w["top"]] == pytest.approx(sorted(elig, reverse=True)[:5])
    assert all(len(c.tokens) == W and c.acts[-1] == pytest.approx(c.activation) for c in w["top"])
    assert len(w["quantiles"]) == 4 and all(len(cs) == 2 for _, cs in w["quantiles"])
    assert all(max(c.activation for c in cs) <= w["top"][-1].activation for _, cs in w["quantiles"])
    assert sum(w["hist_counts"]) == len(vals) == w["n_firings"]


# ---------------------------------------------------------------------------
# A real headless browser
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    if B.find_chromium() is None and shutil.which("apt-get") is None:
        pytest.skip("Chromium is not installed and apt-get is unavailable to install it")
    return B.ensure_chromium()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_console_errors_are_seen(tmp_path, chromium):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><script>console.error("boom"); undefinedFn();</script></body></html>')
    errs = B.console_errors(B.headless(page, dump_dom=True).stderr)
    assert any("boom" in e for e in errs) and any("Uncaught ReferenceError" in e for e in errs), errs


def test_index_renders_in_chromium(tmp_path, chromium):
    index = _site(tmp_path, n_pairs=4)
    res = B.headless(index, dump_dom=True)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert 'id="pairs"' in dom and 'data-ready="1"' in dom
    assert 'data-visible="4"' in dom  # the JS ran over all 4 pair rows
    assert dom.count('href="pages/pair_') == 4 and 'href="pages/split_' in dom
    assert "<script>alert(1)" not in dom
    assert not B.console_errors(res.stderr), B.console_errors(res.stderr)


def test_pair_page_renders_and_screenshot(tmp_path, chromium):
    index = _site(tmp_path, n_pairs=1)
    page = next((index.parent / "pages").glob("pair_*.html"))
    res = B.headless(page, dump_dom=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count('class="col"') == 2 and "<svg" in res.stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in res.stdout and "<script>alert(1)" not in res.stdout
    assert not B.console_errors(res.stderr), B.console_errors(res.stderr)
    png = tmp_path / "pair.png"
    res = B.headless(page, screenshot=png, window_size=(1280, 900))
    assert res.returncode == 0 and png.is_file() and png.stat().st_size > 1000, res.stderr[-2000:]
    assert _png_size(png) == (1280, 900)
    from PIL import Image

    with Image.open(png) as im:
        lo, hi = zip(*im.convert("RGB").getextrema())
    assert any(h - l > 50 for l, h in zip(lo, hi)), "the screenshot is a single colour"
