"""Autointerp on matched latents (SPEC 3.7, Figure 2): contexts, explainer, scorers, paired summary.

Modules: ``llm`` (client interface and backends), ``contexts`` (sparse firings
and the paper's per-latent example sets), ``explain`` (explainer prompt),
``scorers`` (fuzz, simulation, detection), ``run`` (resumable scoring and the
paired t-test).  Importing this package does not import torch or transformers.
"""

from metasae.autointerp.contexts import (Example, Firings, LatentContexts, TokenStrings, build_all_contexts,
                                         build_latent_contexts, collect_firings)
from metasae.autointerp.explain import explain_latent, explain_latents, explainer_messages, parse_explanation
from metasae.autointerp.llm import (CachedClient, Completion, HFLocalClient, LLMFailure, OpenAIClient,
                                    make_client)
from metasae.autointerp.run import count_failed, score_latents, summarize_pairs
from metasae.autointerp.scorers import (SCORERS, balanced_accuracy, parse_binary, parse_simulation,
                                        score_detection, score_fuzz, score_simulation, spearman_score)

__all__ = [
    "Example", "Firings", "LatentContexts", "TokenStrings", "build_all_contexts", "build_latent_contexts",
    "collect_firings", "explain_latent", "explain_latents", "explainer_messages", "parse_explanation",
    "CachedClient", "Completion", "HFLocalClient", "LLMFailure", "OpenAIClient", "make_client", "count_failed", "score_latents",
    "summarize_pairs", "SCORERS", "balanced_accuracy", "parse_binary", "parse_simulation", "score_detection",
    "score_fuzz", "score_simulation", "spearman_score",
]
