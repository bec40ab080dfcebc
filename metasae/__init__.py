"""metasae: joint training of a primary BatchTopK SAE with a meta-SAE
decomposability penalty (MetaSAEs, Levinson 2026), with the paper's metrics,
tables and figures regenerated end to end."""

__version__ = "0.1.0"
