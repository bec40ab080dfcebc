"""Metrics of SPEC section 3: EER thresholds, co-firing phi, reconstruction, matching, splitting."""

from metasae.metrics.cooccurrence import (
    CoFiringCounts,
    CrossCounts,
    FiringChunk,
    HistSpec,
    Histogram,
    PhiSummary,
    SeedTest,
    TopKCrossPhi,
    WelchResult,
    accumulate_counts,
    alive_mask,
    cross_phi_matrix,
    fired_indices,
    firing_from_dense,
    paired_seed_test,
    phi_from_counts,
    phi_summary,
    topk_cross_phi,
    welch_from_summaries,
)
from metasae.metrics.matching import MatchResult, decoder_cosine, hungarian_match
from metasae.metrics.recon import ce_summary, delta_pct, reconstruction_metrics
from metasae.metrics.splitting import is_junk_token, merging_candidates, splitting_candidates
from metasae.metrics.thresholds import (
    EERCalibrator,
    EERResult,
    Fallback,
    calibrate_eer_thresholds,
    load_eer_thresholds,
    rebatch,
    save_eer_thresholds,
    thresholds_path,
)

__all__ = [
    "CoFiringCounts", "CrossCounts", "FiringChunk", "HistSpec", "Histogram", "PhiSummary", "SeedTest",
    "TopKCrossPhi", "WelchResult", "accumulate_counts", "alive_mask", "cross_phi_matrix", "fired_indices",
    "firing_from_dense", "paired_seed_test", "phi_from_counts", "phi_summary", "topk_cross_phi",
    "welch_from_summaries", "MatchResult", "decoder_cosine", "hungarian_match", "ce_summary", "delta_pct",
    "reconstruction_metrics", "is_junk_token", "merging_candidates", "splitting_candidates", "EERCalibrator",
    "EERResult", "Fallback", "calibrate_eer_thresholds", "load_eer_thresholds", "rebatch",
    "save_eer_thresholds", "thresholds_path",
]
