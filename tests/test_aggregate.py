import math

import numpy as np
import pytest
from scipy import stats

from metasae.aggregate import aggregate_rows, matched_reconstruction, mean_se, paired_by_seed
from metasae.pipeline import select_config


def test_mean_se_matches_numpy_and_skips_nonfinite():
    m, se, n = mean_se([1.0, 2.0, 4.0, float("nan"), None])
    assert n == 3 and m == pytest.approx(7 / 3)
    assert se == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert math.isnan(mean_se([5.0])[1]) and mean_se([])[2] == 0


def test_aggregate_rows_groups_by_key():
    rows = {0: [{"run": "a", "x": 1.0, "lam": 0.1}, {"run": "b", "x": 10.0, "lam": 0.3}],
            1: [{"run": "a", "x": 3.0, "lam": 0.1}, {"run": "b", "x": 14.0, "lam": 0.3}]}
    out = aggregate_rows(rows, "run", ["x"], carry=["lam"])
    assert [r["run"] for r in out] == ["a", "b"]
    assert out[0]["x_mean"] == 2.0 and out[1]["x_mean"] == 12.0 and out[1]["lam"] == 0.3
    assert out[0]["n_seeds"] == 2 and out[0]["x_se"] == pytest.approx(1.0)


def test_paired_by_seed_equals_scipy_ttest_rel():
    a = [1.0, 2.5, 2.0, 4.0]
    b = [1.5, 3.0, 3.5, 4.2]
    rows = {s: [{"run": "j", "m": a[s]}, {"run": "s", "m": b[s]}] for s in range(4)}
    res = paired_by_seed(rows, "j", "s", "m")
    ref = stats.ttest_rel(a, b)
    assert res["n"] == 4 and res["t"] == pytest.approx(ref.statistic) and res["p"] == pytest.approx(ref.pvalue)
    assert res["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))


def test_matched_reconstruction_picks_closest_cost():
    rows = [{"role": "ortho", "delta_l2_pct": 1.0, "run": "o1"}, {"role": "ortho", "delta_l2_pct": 8.0, "run": "o2"},
            {"role": "grid", "delta_l2_pct": 5.0, "run": "g"}]
    assert matched_reconstruction(rows, 6.0, "ortho")["run"] == "o2"
    assert matched_reconstruction(rows, 6.0, "meta_size") is None


def _row(run, dphi, dl2, role="grid"):
    return {"run": run, "role": role, "delta_abs_phi_pct": dphi, "delta_l2_pct": dl2}


def test_selection_rule_prefers_lowest_phi_within_reconstruction_budget():
    rows = [_row("solo", 0, 0, "solo"), _row("a", -3.8, 3.5), _row("b", -7.5, 9.3), _row("c", -9.0, 19.6),
            _row("d", 2.8, 19.6)]
    assert select_config(rows) == "b"  # the paper's own table: lambda2 = 0.3, sigma2 = 1.0
    assert select_config(rows, max_delta_l2_pct=5.0) == "a"
    # nothing cheap enough: the cheapest configuration that lowers |phi|
    assert select_config([_row("x", -1.0, 30.0), _row("y", -5.0, 40.0)], max_delta_l2_pct=5.0) == "x"
    with pytest.raises(ValueError):
        select_config([_row("solo", 0, 0, "solo")])
