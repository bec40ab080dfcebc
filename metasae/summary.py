"""The numbers of a finished run, in one small file that can be committed.

    python -m metasae.summary --out outputs/default --dest results/default

After a complete run (``<out>/results.json`` exists; otherwise one sentence on
stderr and exit status 2), this copies every table ``<out>/tables/*.csv`` and
``*.md`` to ``<dest>/tables/`` (removing tables there that the run no longer
has) and writes ``<dest>/summary.json``:

* ``git_commit``, ``git_dirty``, ``profile``, ``seeds``, ``finished`` (from
  ``results.json``, the seeds falling back to ``config.json``),
  ``wall_s_total``, ``wall_s_total_includes_setup``, ``setup_s`` and
  ``stages`` (the harness's timings), ``machine`` (the machine's speed before and
  after the run, :mod:`metasae.machine`; empty when the run did not probe it);
* ``solo_quality``: per seed, ``dead_frac``, ``explained_variance_std`` and
  ``ce_loss_score`` of the solo SAE (``seed<s>/metrics/eval.json``, entry
  ``solo``) and ``mse_last_quarter_rel_improvement`` from its training history
  (:func:`mse_last_quarter_rel_improvement`);
* ``meta_explained_variance``: per seed, the headline joint run's
  ``meta_explained_variance`` in ``eval.json``;
* ``headline``: the joint configuration (``selection.json``: ``replicated``,
  else ``selected``) against the solo over the seeds whose ``eval.json`` has
  both: ``n_seeds``, ``delta_phi_pct_mean`` / ``_se``, ``p_paired`` (paired t
  test over seeds of the joint's mean |phi| against the solo's), ``mde_pct``,
  ``delta_l2_pct_mean`` / ``_se``, ``delta_ce_pct_mean`` / ``_se`` and
  ``per_seed``; ``delta_phi_pct_sd`` (over seeds) and ``seeds_for_mde_target``, the seeds
  that SD would need for an MDE of ``mde_target_pct`` (3 percentage points).  Per seed,
  Delta |phi| % = 100 (phi_joint / phi_solo - 1) of ``mean_abs_phi``; Delta L2 % the same of
  ``mse`` (the global-threshold rule);
  Delta CE = joint ``delta_ce_pct`` - solo ``delta_ce_pct`` (percentage points);
  ``config`` names the joint run again and ``delta_phi_pct_ci95`` is the 95% t
  interval of the mean Delta |phi|;
* ``comparisons``: the independent solo and the lambda2 = 0 control against the
  solo, the control's meta explained variance, the CE loss score with every
  token spliced, Delta |phi| along training and the selection (each as mean /
  se / n over the seeds, the Delta |phi| ones with the one-sample p against 0);
* ``grid_first_seed``: every SAE of the first seed against its solo;
* ``synthetic_verdict``: the sentence of ``07_synthetic``'s verdict table;
* ``autointerp``: the judge, its AUC on the validation set (``validation_auc``:
  score -> correct vs random explanations) and, over the matched pairs of every
  seed with autointerp pooled (``seeds``), ``vs_random`` (score -> real minus
  random-explanation score on the solo SAE's latents, with its 95% CI),
  ``joint_vs_solo`` (paired over pairs) and ``joint_vs_solo_over_seeds`` (paired
  over seeds), and ``pairs_speed``: the seconds and requests of every seed's pairs,
  with where the seconds went (the explainer, the scorers, the rest) when recorded.

A number that cannot be computed (a missing key or file, fewer than two seeds
for a spread) is ``null``, never an error.  Seeds are JSON object keys, so
strings.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from metasae import paths
from metasae.io import atomic_path, atomic_write_json

SUMMARY_NAME = "summary.json"
TABLE_SUFFIXES = (".csv", ".md")
SOLO = "solo"
SOLO_KEYS = ("dead_frac", "explained_variance_std", "ce_loss_score", "l0_threshold")
HISTORY_WINDOW = 0.10
"""Width of the averaging windows of :func:`mse_last_quarter_rel_improvement`, as a fraction of training."""
ALPHA = 0.05
POWER = 0.8
MDE_TARGET_PCT = 3.0
"""The default run's bar on the headline's minimum detectable effect (percentage points of Delta |phi| %)."""
MAX_SEEDS = 1000


class SummaryError(RuntimeError):
    """The run cannot be summarised; the message is one sentence for the user."""


# ---------------------------------------------------------------------------
# Small readers: a missing or malformed file is None, never an exception
# ---------------------------------------------------------------------------


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _num(value: Any) -> float | None:
    """A finite float, else None (bools, strings, nan and inf are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _get(d: Any, key: str) -> float | None:
    return _num(d.get(key)) if isinstance(d, dict) else None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _sd(xs: Sequence[float]) -> float | None:
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _se(xs: Sequence[float]) -> float | None:
    sd = _sd(xs)
    return None if sd is None else sd / math.sqrt(len(xs))


# ---------------------------------------------------------------------------
# Training history of the solo SAE
# ---------------------------------------------------------------------------


def find_history(out: Path, seed: int | str, run: str = SOLO) -> Path | None:
    """The training history of `run`: ``checkpoints/<run>/history.json``, else the
    one in the step folder that ``checkpoints/trainer.json`` commits, else the
    latest step folder's."""
    ckpt = Path(out) / f"seed{seed}" / "checkpoints"
    direct = ckpt / run / "history.json"
    if direct.is_file():
        return direct
    trainer = _read(ckpt / "trainer.json")
    step = trainer.get("step") if isinstance(trainer, dict) else None
    if isinstance(step, int) and not isinstance(step, bool):
        committed = ckpt / run / f"step{step:08d}" / "history.json"
        if committed.is_file():
            return committed
    steps = sorted((ckpt / run).glob("step*/history.json")) if (ckpt / run).is_dir() else []
    return steps[-1] if steps else None


def mse_last_quarter_rel_improvement(history: Iterable[Any], window: float = HISTORY_WINDOW) -> float | None:
    """How much the training MSE still fell over the last quarter of training.

    With T the last logged step and w = `window` x T (10 % of training):

        mse_75    = mean ``mse`` of the rows with step in (0.75 T - w, 0.75 T]
        mse_final = mean ``mse`` of the rows with step in (T - w, T]
        value     = (mse_75 - mse_final) / mse_75

    Averaging over a window smooths the per-batch noise of the logged MSE; a
    window with no logged row uses the row whose step is nearest to its end.
    Rows without a finite ``step`` and ``mse`` are ignored.  0.05 means the
    MSE fell 5 % over the last quarter (training had nearly converged); a
    negative value means it rose.  None with fewer than two usable rows or a
    non-positive mse_75.
    """
    rows = []
    for r in history or []:
        if isinstance(r, dict):
            step, mse = _get(r, "step"), _get(r, "mse")
            if step is not None and mse is not None:
                rows.append((step, mse))
    if len(rows) < 2:
        return None
    rows.sort()
    total = rows[-1][0]
    if total <= 0:
        return None
    width = window * total

    def window_mean(end: float) -> float:
        inside = [m for s, m in rows if end - width < s <= end]
        if inside:
            return sum(inside) / len(inside)
        return min(rows, key=lambda sm: abs(sm[0] - end))[1]

    mse_75, mse_final = window_mean(0.75 * total), window_mean(total)
    if mse_75 <= 0:
        return None
    return (mse_75 - mse_final) / mse_75


# ---------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------


def _seeds(results: dict[str, Any], config: Any) -> list[int]:
    for source in (results.get("seeds"), config.get("seeds") if isinstance(config, dict) else None):
        if isinstance(source, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in source):
            return list(source)
    return []


def headline_name(out: Path) -> str | None:
    """The joint configuration compared with the solo: ``selection.json``'s
    ``replicated``, else its ``selected``."""
    sel = _read(Path(out) / "selection.json")
    if not isinstance(sel, dict):
        return None
    for key in ("replicated", "selected"):
        if isinstance(sel.get(key), str) and sel[key]:
            return sel[key]
    return None


def _eval(out: Path, seed: int) -> dict[str, Any]:
    ev = _read(Path(out) / f"seed{seed}" / "metrics" / "eval.json")
    return ev if isinstance(ev, dict) else {}


def solo_quality(out: Path, seed: int) -> dict[str, float | None]:
    solo = _eval(out, seed).get(SOLO)
    row: dict[str, float | None] = {k: _get(solo, k) for k in SOLO_KEYS}
    hist_path = find_history(out, seed)
    history = _read(hist_path) if hist_path is not None else None
    row["mse_last_quarter_rel_improvement"] = (
        mse_last_quarter_rel_improvement(history) if isinstance(history, list) else None)
    return row


def _ratio_pct(joint: float | None, solo: float | None) -> float | None:
    if joint is None or solo is None or solo == 0:
        return None
    return 100.0 * (joint / solo - 1.0)


def per_seed_deltas(ev: dict[str, Any], joint: str) -> dict[str, float | None] | None:
    """The joint-vs-solo numbers of one seed's eval.json; None when either run is absent."""
    j, s = ev.get(joint), ev.get(SOLO)
    if not isinstance(j, dict) or not isinstance(s, dict):
        return None
    l2_key = "mse"  # the one reconstruction rule (global threshold calibrated to L0 = k)
    ce_j, ce_s = _get(j, "delta_ce_pct"), _get(s, "delta_ce_pct")
    return {
        "phi_joint": _get(j, "mean_abs_phi"),
        "phi_solo": _get(s, "mean_abs_phi"),
        "delta_phi_pct": _ratio_pct(_get(j, "mean_abs_phi"), _get(s, "mean_abs_phi")),
        "delta_l2_pct": _ratio_pct(_get(j, l2_key), _get(s, l2_key)),
        "delta_ce_pct": ce_j - ce_s if ce_j is not None and ce_s is not None else None,
    }


def paired_p(joint: Sequence[float], solo: Sequence[float]) -> float | None:
    """Two-sided p of the paired t test (scipy.stats.ttest_rel); None below two pairs."""
    if len(joint) < 2 or len(joint) != len(solo):
        return None
    from scipy import stats

    return _num(float(stats.ttest_rel(joint, solo).pvalue))


def mde_from_sd(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect of a paired t test over n seeds whose per-seed values have
    standard deviation sd, two-sided at `alpha` with `power`: (t_{1-alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n)."""
    from scipy import stats

    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n))


def mde(values: Sequence[float], alpha: float = ALPHA, power: float = POWER) -> float | None:
    """:func:`mde_from_sd` over len(values) seeds, sd the measured standard deviation of the per-seed values."""
    sd = _sd(values)
    if sd is None:
        return None
    return _num(mde_from_sd(sd, len(values), alpha, power))


def seeds_for_mde(sd: float | None, target: float = MDE_TARGET_PCT, alpha: float = ALPHA,
                  power: float = POWER) -> int | None:
    """The fewest seeds n >= 2 with :func:`mde_from_sd` <= target, taking ``sd`` (the measured
    seed-to-seed SD) as the truth; None without an SD or beyond :data:`MAX_SEEDS`."""
    if sd is None or not math.isfinite(sd) or sd < 0 or target <= 0:
        return None
    return next((n for n in range(2, MAX_SEEDS + 1) if mde_from_sd(sd, n, alpha, power) <= target), None)


def headline(out: Path, seeds: Sequence[int]) -> dict[str, Any]:
    name = headline_name(out)
    per_seed: dict[str, dict[str, float | None]] = {}
    if name is not None:
        for seed in seeds:
            d = per_seed_deltas(_eval(out, seed), name)
            if d is not None:
                per_seed[str(seed)] = d

    def values(key: str) -> list[float]:
        return [v[key] for v in per_seed.values() if v[key] is not None]

    pairs = [(v["phi_joint"], v["phi_solo"]) for v in per_seed.values()
             if v["phi_joint"] is not None and v["phi_solo"] is not None]
    dphi = values("delta_phi_pct")
    lo, hi = ci95(dphi)
    return {
        "joint": name,
        "config": name,
        "baseline": SOLO,
        "n_seeds": len(per_seed),
        "seeds": [int(s) for s in per_seed],
        "delta_phi_pct_mean": _mean(dphi),
        "delta_phi_pct_se": _se(dphi),
        "delta_phi_pct_ci95": [lo, hi],
        "p_paired": paired_p([p[0] for p in pairs], [p[1] for p in pairs]),
        "mde_pct": mde(dphi),
        "mde_alpha": ALPHA,
        "mde_power": POWER,
        "delta_phi_pct_sd": _sd(dphi),
        "mde_target_pct": MDE_TARGET_PCT,
        "seeds_for_mde_target": seeds_for_mde(_sd(dphi)),
        "delta_l2_pct_mean": _mean(values("delta_l2_pct")),
        "delta_l2_pct_se": _se(values("delta_l2_pct")),
        "delta_ce_pct_mean": _mean(values("delta_ce_pct")),
        "delta_ce_pct_se": _se(values("delta_ce_pct")),
        "per_seed": per_seed,
    }


def one_sample_p(xs: Sequence[float]) -> float | None:
    """Two-sided p of the one-sample t test of mean 0 (scipy.stats.ttest_1samp); None below two
    values or with no spread."""
    if len(xs) < 2 or (_sd(xs) or 0.0) == 0.0:
        return None
    from scipy import stats

    return _num(float(stats.ttest_1samp(list(xs), 0.0).pvalue))


def ci95(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """The 95% t interval of the mean of `xs` (None, None below two values)."""
    m, se = _mean(xs), _se(xs)
    if m is None or se is None or len(xs) < 2:
        return None, None
    from scipy import stats

    h = float(stats.t.ppf(0.975, len(xs) - 1)) * se
    return m - h, m + h


def stat(xs: list[float], test: bool = False) -> dict[str, Any]:
    """mean, se and n of per-seed values; with `test`, also the one-sample p against 0."""
    row = {"mean": _mean(xs), "se": _se(xs), "n": len(xs)}
    if test:
        row["p"] = one_sample_p(xs)
    return row


def grid_first_seed(out: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Every SAE of the first seed against that seed's solo (Delta |phi| %, Delta L2 %, Delta CE
    pp; :func:`per_seed_deltas`): the grid, the ablations and the baselines, trained on one seed."""
    if not seeds:
        return {}
    ev = _eval(out, seeds[0])
    rows = {}
    for name in ev:
        if name != SOLO:
            d = per_seed_deltas(ev, name)
            if d is not None:
                rows[name] = {k: d[k] for k in ("delta_phi_pct", "delta_l2_pct", "delta_ce_pct")}
    return {"seed": seeds[0], "runs": rows}


def synthetic_verdict(out: Path) -> str | None:
    """The sentence of ``tables/synthetic_verdict.csv`` (07_synthetic), or None."""
    import csv

    path = Path(out) / "tables" / "synthetic_verdict.csv"
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return None
    text = rows[0].get("verdict") if rows else None
    return text if isinstance(text, str) and text else None


def comparisons(out: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Beside the headline: Delta |phi| % of the other SAEs trained on every seed against the
    solo (the independent solo = seed noise; the lambda2 = 0 control), the CE loss score with
    every token spliced (massive activations included), and Delta |phi| along training
    (``metrics/snapshots.json``), each as mean / se / n over the seeds that have it."""
    res: dict[str, Any] = {}
    for name in ("solo_indep1", "joint_l0"):
        d = [v for v in (_ratio_pct(_get(_eval(out, s).get(name), "mean_abs_phi"), _get(_eval(out, s).get(SOLO),
             "mean_abs_phi")) for s in seeds) if v is not None]
        res[f"delta_phi_pct_{name}"] = stat(d, test=True)
    for name in ("joint_l0",):  # the meta SAE of the control reads rows no penalty pushed away
        mev = [v for v in (_get(_eval(out, s).get(name), "meta_explained_variance") for s in seeds) if v is not None]
        res[f"meta_explained_variance_{name}"] = stat(mev)
    ce_all = [v for v in (_get(_eval(out, s).get(SOLO), "ce_loss_score_all_tokens") for s in seeds) if v is not None]
    res["solo_ce_loss_score_all_tokens"] = stat(ce_all)
    along: dict[str, list[float]] = {}
    joint = headline_name(out)
    for s in seeds:
        snap = _read(Path(out) / f"seed{s}" / "metrics" / "snapshots.json")
        rows = snap.get("rows", []) if isinstance(snap, dict) else []
        by = {}
        for r in rows:
            if isinstance(r, dict):
                by.setdefault(round(float(r.get("frac", 0)), 3), {})[r.get("run")] = _num(r.get("mean_abs_phi"))
        for frac, runs in by.items():
            d = _ratio_pct(runs.get(joint), runs.get(SOLO))
            if d is not None:
                along.setdefault(f"{frac:g}", []).append(d)
    res["delta_phi_pct_along_training"] = {k: stat(v, test=True) for k, v in sorted(along.items(), key=lambda kv: float(kv[0]))}
    sel = _read(Path(out) / "selection.json")
    res["selection"] = sel if isinstance(sel, dict) else None
    return res


PHASES = ("explain_s", "score_s", "other_s", "n_explained")
"""Where a seed's autointerp seconds went (``pipeline.autointerp_seed``'s ``speed``): the explainer, the
scorers, the rest (contexts, loading the models); and how many explanations were generated."""


def pooled_speed(speeds: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """The seeds' autointerp ``speed`` records summed: ``seconds``, ``n_requests``, ``per_seed`` seconds,
    and each of :data:`PHASES` where every seed recorded it (runs before it was recorded have none)."""
    res: dict[str, Any] = {"seconds": sum(_num(v.get("seconds")) or 0.0 for v in speeds.values()),
                           "n_requests": sum(int(v.get("n_requests") or 0) for v in speeds.values()),
                           "per_seed": {str(s): _num(v.get("seconds")) for s, v in speeds.items()}}
    for key in PHASES:
        vals = [_num(v.get(key)) for v in speeds.values()]
        if vals and None not in vals:
            total = sum(vals)  # type: ignore[arg-type]
            res[key] = int(total) if key.startswith("n_") else total
    return res


def autointerp_block(out: Path, seeds: Sequence[int]) -> dict[str, Any] | None:
    """``judge``, ``validation_auc`` (score -> AUC of correct vs random explanations on the
    validation set, with ``validation_auc_ci`` and ``validation_auc_vs_wrong``), and, over the
    matched pairs of every seed with autointerp pooled (``seeds``): ``vs_random`` (score -> real
    minus random-explanation score on the solo SAE's latents: ``diff``, ``ci_low``, ``ci_high``,
    ``n``, ``p``), ``joint_vs_solo`` (paired over the pooled pairs), ``joint_vs_solo_over_seeds``
    (each seed's mean difference as one observation) and ``pairs_speed`` (:func:`pooled_speed`:
    seconds and requests summed over the seeds, ``per_seed`` seconds, and where they went);
    ``seed`` is the first of ``seeds``.  None
    without any autointerp."""
    from metasae.autointerp.run import pooled_pairs, summarize_pooled

    val = _read(Path(out) / "autointerp" / "validation_summary.json")
    pooled = pooled_pairs(out, seeds)
    if not isinstance(val, dict) and pooled is None:
        return None
    judge = (val if isinstance(val, dict) else {}).get("judge") or (pooled or {}).get("judge")
    vs = val.get("summary", {}) if isinstance(val, dict) else {}
    res: dict[str, Any] = {
        "judge": judge.get("model") if isinstance(judge, dict) else None,
        "backend": judge.get("backend") if isinstance(judge, dict) else None,
        # who wrote the explanations (the judge itself unless autointerp.judge_model is set)
        "explainer": (judge.get("explainer") or judge.get("model")) if isinstance(judge, dict) else None,
        "validation_latents": val.get("latents") if isinstance(val, dict) else None,
        "validation_auc": {k: _num(v.get("auc_vs_random")) for k, v in vs.items()},
        "validation_auc_ci": {k: v.get("auc_vs_random_ci") for k, v in vs.items()},
        "validation_auc_vs_wrong": {k: _num(v.get("auc_vs_wrong")) for k, v in vs.items()},
        "validation_speed": val.get("speed") if isinstance(val, dict) else None,
        "vs_random": None, "seed": None, "seeds": [], "n_pairs_scored": None, "joint_vs_solo": None,
        "joint_vs_solo_over_seeds": None,
    }
    if pooled is not None:
        speeds = {s: v for s, v in pooled["speed"].items() if isinstance(v, dict)}
        stats = summarize_pooled(pooled)
        res.update(seed=pooled["seeds"][0], seeds=pooled["seeds"], n_pairs_scored=pooled["n_pairs_scored"],
                   n_pairs_embedding_only=pooled["n_pairs_embedding_only"], n_pairs_missing=pooled["n_missing"],
                   pairs_speed=pooled_speed(speeds),
                   vs_random=stats["vs_random"], joint_vs_solo=stats["joint_vs_solo"],
                   joint_vs_solo_over_seeds=stats["over_seeds"])
    return res


def build_summary(out_dir: str | Path) -> dict[str, Any]:
    """The summary of the complete run in `out_dir` (see the module docstring)."""
    out = Path(out_dir)
    results = _read(out / "results.json")
    if not isinstance(results, dict):
        raise SummaryError(f"{out / 'results.json'} does not exist or is not readable: "
                           "summarise a complete run (bash run_all.sh writes it when every notebook succeeded)")
    config = _read(out / "config.json")
    seeds = _seeds(results, config)
    name = headline_name(out)
    return {
        "profile": results.get("profile") or (config.get("name") if isinstance(config, dict) else None),
        "seeds": seeds,
        "git_commit": results.get("commit"),
        "git_dirty": results.get("dirty"),
        "finished": results.get("finished"),
        "wall_s_total": _num(results.get("wall_s_total")),
        "wall_s_total_includes_setup": results.get("wall_s_total_includes_setup"),
        "setup_s": _num(results.get("setup_s")),
        "stages": results.get("stages") if isinstance(results.get("stages"), dict) else {},
        "machine": results.get("machine") if isinstance(results.get("machine"), dict) else {},
        "solo_quality": {str(s): solo_quality(out, s) for s in seeds},
        "meta_explained_variance": {
            str(s): (_get(_eval(out, s).get(name), "meta_explained_variance") if name else None) for s in seeds},
        "headline": headline(out, seeds),
        "comparisons": comparisons(out, seeds),
        "grid_first_seed": grid_first_seed(out, seeds),
        "synthetic_verdict": synthetic_verdict(out),
        "autointerp": autointerp_block(out, seeds),
    }


def copy_tables(out: Path, dest: Path) -> list[Path]:
    """Copy ``<out>/tables/*.csv|*.md`` to ``<dest>/tables/``; drop tables there the run lacks."""
    src_dir, dst_dir = Path(out) / "tables", Path(dest) / "tables"
    sources = sorted(p for p in src_dir.glob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES) \
        if src_dir.is_dir() else []
    dst_dir.mkdir(parents=True, exist_ok=True)
    keep = {p.name for p in sources}
    for old in dst_dir.glob("*"):
        if old.is_file() and old.suffix in TABLE_SUFFIXES and old.name not in keep:
            old.unlink()
    copied = []
    for p in sources:
        with atomic_path(dst_dir / p.name) as tmp:
            shutil.copyfile(p, tmp)
        copied.append(dst_dir / p.name)
    return copied


def write_summary(out_dir: str | Path, dest_dir: str | Path) -> Path:
    """Copy the tables and write ``<dest>/summary.json``; return its path."""
    summary = build_summary(out_dir)
    dest = Path(dest_dir)
    copy_tables(Path(out_dir), dest)
    path = dest / SUMMARY_NAME
    atomic_write_json(path, summary)
    return path


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metasae.summary",
                                description="Copy a finished run's tables and write summary.json.")
    p.add_argument("--out", default=str(paths.REPO_ROOT / "outputs" / "default"),
                   help="the run's output folder (holding results.json); default: outputs/default")
    p.add_argument("--dest", default=str(paths.REPO_ROOT / "results" / "default"),
                   help="where tables/ and summary.json go; default: results/default")
    args = p.parse_args(argv)
    try:
        path = write_summary(args.out, args.dest)
    except SummaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the summary to {args.dest}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
