"""The plotting helpers of metasae.report draw what a reader can use: Figure 1a's
|phi| density on a log axis whose bins hold the data, Figure 2 panels that state
n and say 'not enough data' rather than show an empty axis, and token axes whose
tick labels stay few and apart."""

from __future__ import annotations

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PathCollection, PolyCollection  # noqa: E402
from matplotlib.patches import Rectangle, StepPatch  # noqa: E402

from metasae.metrics.cooccurrence import CoFiringCounts, firing_from_dense, phi_summary  # noqa: E402
from metasae.report import (MIN_DENSITY_PAIRS, PHI_LOG_EDGES, abs_phi_cdf, abs_phi_log_density,  # noqa: E402
                            count_label, format_small_axis, format_tokens_axis, not_enough_data,
                            plot_phi_density, plot_phi_density_diff, plot_score_density_diff)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _drawn(ax) -> int:
    """How many data artists an axes holds (lines, patches, collections, text notes)."""
    return len(ax.lines) + len(ax.patches) + len(ax.collections) + len(ax.texts)


def _firing_with_structure(rng: np.random.Generator, n_tokens: int = 4000, n_latents: int = 60) -> np.ndarray:
    """Binary firings whose pairs spread |phi| over several decades: independent latents (|phi| ~ 1e-3..5e-2)
    and noisy copies of them (|phi| ~ 0.1..0.9)."""
    fired = rng.random((n_tokens, n_latents)) < rng.uniform(0.01, 0.2, n_latents)
    for i in range(0, 12):
        keep = rng.random(n_tokens) < rng.uniform(0.2, 0.95)
        fired[:, n_latents - 1 - i] = fired[:, i] & keep
    return fired


def _summary_of(fired: np.ndarray):
    counts = CoFiringCounts(fired.shape[1])
    counts.update(firing_from_dense(fired))
    return phi_summary(counts)


def _exact_abs_phi(fired: np.ndarray) -> np.ndarray:
    phi = np.corrcoef(fired.T.astype(float))  # phi of two binary variables = their Pearson correlation
    return np.abs(phi[np.triu_indices_from(phi, k=1)])


# ---------------------------------------------------------------------------
# Figure 1a: |phi| on a log axis
# ---------------------------------------------------------------------------


def test_log_phi_density_matches_the_exact_phi_values() -> None:
    fired = _firing_with_structure(np.random.default_rng(0))
    summary, abs_phi = _summary_of(fired), _exact_abs_phi(fired)
    assert summary.n_pairs == abs_phi.size
    assert abs_phi.min() < 1e-3 and abs_phi.max() > 0.3  # the data span the fine and the full histogram
    edges = PHI_LOG_EDGES
    share = np.histogram(abs_phi, edges)[0] / abs_phi.size
    drawn = abs_phi_log_density(summary, edges) * np.diff(np.log10(edges))  # back to the share of pairs per bin
    np.testing.assert_allclose(drawn, share, atol=0.01)
    # the bins hold every pair but those left of the axis, which the legend reports
    below = float(abs_phi_cdf(summary, edges[0]))
    assert below == pytest.approx(np.mean(abs_phi < edges[0]), abs=0.01)
    assert drawn.sum() + below == pytest.approx(1.0, abs=1e-9)


def test_phi_log_bins_are_coarse_and_cover_phi() -> None:
    decades = np.log10(PHI_LOG_EDGES[-1] / PHI_LOG_EDGES[0])
    assert PHI_LOG_EDGES[-1] == pytest.approx(1.0)  # |phi| <= 1
    assert len(PHI_LOG_EDGES) - 1 <= 6 * decades  # a handful of bins per decade, not thousands of slivers


def test_phi_density_one_seed_log_axis_with_n() -> None:
    rng = np.random.default_rng(1)
    solo, joint = _summary_of(_firing_with_structure(rng)), _summary_of(_firing_with_structure(rng))
    fig, (a, b) = plt.subplots(1, 2)
    dens = plot_phi_density(a, {"solo": [solo], "joint": [joint]})
    diff = plot_phi_density_diff(b, {"solo": [solo], "joint": [joint]}, "joint")
    for ax in (a, b):
        assert ax.get_xscale() == "log"
        assert ax.get_xlim() == pytest.approx((PHI_LOG_EDGES[0], PHI_LOG_EDGES[-1]))
        assert not any(isinstance(c, PolyCollection) for c in ax.collections)  # one seed: no band
    assert dens["solo"].shape == (1, len(PHI_LOG_EDGES) - 1)
    np.testing.assert_allclose(diff[0], dens["joint"][0] - dens["solo"][0])
    legend = [t.get_text() for t in a.get_legend().get_texts()]
    assert legend[0].startswith(f"solo: n = {count_label(solo.n_pairs, 3)} pairs")
    assert "joint − solo: n = 1 seed" in [t.get_text() for t in b.get_legend().get_texts()]


def test_phi_density_over_seeds_draws_a_band_and_pairs_by_seed() -> None:
    rng = np.random.default_rng(2)
    runs = {"solo": [_summary_of(_firing_with_structure(rng)) for _ in range(3)],
            "joint": [_summary_of(_firing_with_structure(rng)) for _ in range(3)]}
    fig, (a, b) = plt.subplots(1, 2)
    dens = plot_phi_density(a, runs)
    diff = plot_phi_density_diff(b, runs, "joint")
    assert dens["joint"].shape == (3, len(PHI_LOG_EDGES) - 1)
    np.testing.assert_allclose(diff, dens["joint"] - dens["solo"])  # seed by seed
    for ax in (a, b):
        bands = [p for p in ax.patches if isinstance(p, StepPatch) and p.get_fill()]
        assert bands, "several seeds are drawn with a band"
        assert ax.get_legend().get_title().get_text() == "mean ± SE over seeds"
    assert any("n = 3 seeds" in t.get_text() for t in a.get_legend().get_texts())
    with pytest.raises(ValueError, match="paired by seed"):
        plot_phi_density_diff(b, {"solo": runs["solo"], "joint": runs["joint"][:2]}, "joint")


# ---------------------------------------------------------------------------
# Figure 2: n on its face, never an empty axis
# ---------------------------------------------------------------------------


def test_not_enough_data_states_n_and_need() -> None:
    fig, ax = plt.subplots()
    text = not_enough_data(ax, 3, 20, "pairs")
    assert "not enough data" in text.get_text()
    assert "n = 3 pairs (need ≥ 20)" in text.get_text()
    assert _drawn(ax) == 1


def test_score_panel_with_few_pairs_shows_them_and_says_so() -> None:
    fig, ax = plt.subplots()
    joint, solo = [0.5, 0.7, None, 0.2], [0.5, 0.4, 0.6, np.nan]  # pairs 3 and 4 lack a score: n = 2
    n = plot_score_density_diff(ax, joint, solo, title="fuzz")
    assert n == 2
    assert ax.get_title() == "fuzz: n = 2 pairs"
    assert any(f"n = 2 pairs (need ≥ {MIN_DENSITY_PAIRS})" in t and "not enough data" in t for t in _texts(ax))
    points = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert sorted(map(tuple, points)) == [(0.4, 2), (0.5, 1), (0.5, 1), (0.7, 2)]  # (score, pair row)
    assert list(ax.get_yticks()) == [1, 2]


def test_score_panel_with_no_pairs_is_a_clear_note() -> None:
    fig, ax = plt.subplots()
    assert plot_score_density_diff(ax, (), (), title="simulation", score_range=(-1, 1)) == 0
    assert ax.get_title() == "simulation: n = 0 pairs"
    assert any("n = 0 pairs" in t for t in _texts(ax))
    assert ax.get_xlim() == (-1, 1) and len(ax.get_yticks()) == 0


def test_score_panel_with_enough_pairs_draws_densities_and_difference() -> None:
    rng = np.random.default_rng(3)
    fig, ax = plt.subplots()
    n = plot_score_density_diff(ax, rng.beta(3, 2, 60), rng.beta(2, 2, 60), title="detection_auc", n_bins=10)
    assert n == 60 and ax.get_title() == "detection_auc: n = 60 pairs"
    assert not _texts(ax)  # no 'not enough data' note
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 10
    widths = {round(p.get_width(), 9) for p in bars}
    assert widths == {0.09}


def test_identical_scores_do_not_give_a_blank_panel() -> None:
    """The committed Figure 2 was blank: equal joint and solo scores give a zero difference everywhere.
    The densities are drawn beside the difference, so the panel still shows where the scores lie."""
    fig, ax = plt.subplots()
    plot_score_density_diff(ax, [0.5] * 30, [0.5] * 30, title="fuzz")
    steps = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert len(steps) == 2 and all(np.max(p.get_data().values) > 0 for p in steps)
    assert all(p.get_height() == 0 for p in ax.patches if isinstance(p, Rectangle))


# ---------------------------------------------------------------------------
# Token axes: few ticks, labels apart
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", [17, 8])  # the training-curve figure's four panels, and narrower ones
@pytest.mark.parametrize("tokens", [49_152, 2_359_296, 123_456_789, 2_400_000_000, 10**11])
def test_token_axis_ticks_are_few_and_do_not_overlap(tokens: int, width: float) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(width, 3.6))
    for ax in axes:
        x = np.linspace(tokens / 50, tokens, 50)
        ax.plot(x, 1 / x)
        format_tokens_axis(ax)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert 3 <= len(ticks) <= 8
    labels = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert len(labels) == len(ticks)
    assert all(len(t.get_text()) <= 5 for t in labels), [t.get_text() for t in labels]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    gaps = [right.x0 - left.x1 for left, right in zip(boxes, boxes[1:])]
    assert min(gaps) > 5, f"tick labels closer than 5 px: {[t.get_text() for t in labels]}"
    assert ax.xaxis.get_offset_text().get_text() == ""  # the unit is in the labels, not in a '1e6' corner
    assert ax.get_xlabel() == "training tokens"


def test_count_label() -> None:
    assert [count_label(x) for x in (0, 500, 25_000, 1_500_000, 2e9, 102_500)] == \
        ["0", "500", "25k", "1.5M", "2B", "102.5k"]
    assert count_label(2_650_753, 3) == "2.65M"


def test_small_axis_ticks_are_few_and_do_not_run_together() -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([-5.4e-4, -3.2e-4, -2e-4, 0, 1e-4, 2.7e-4], [-0.08, -0.08, -0.06, -0.02, -0.006, -0.03])
    format_small_axis(ax.xaxis)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    labels = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert 2 <= len(labels) <= 6
    texts = [t.get_text().replace("$\\mathdefault{", "").replace("}$", "") for t in labels]
    assert all(len(s) <= 3 for s in texts), texts  # -4, -2, 0, 2: the scale is in the offset
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    assert min(r.x0 - l.x1 for l, r in zip(boxes, boxes[1:])) > 5
    assert "10^{" in ax.xaxis.get_offset_text().get_text()  # the scale is stated once
    plt.close(fig)
