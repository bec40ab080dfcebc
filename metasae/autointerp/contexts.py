"""Per-latent activation contexts for autointerp (SPEC 3.7, paper-notes 5.2).

Latent i *fires* at (row r, position t) iff its pre-activation exceeds its EER
threshold theta_i (SPEC 3.1).  :func:`collect_firings` streams the autointerp
split once and keeps, per latent, the sparse list of (row, pos, activation).
:func:`build_latent_contexts` then follows the paper's released code: only
positions t >= window - 1 are eligible, each context is the ``window``-token
window *ending at* the firing token, firings are sorted and cut into five
quintiles, and the explanation, simulation and fuzz/detection sets are drawn
per quintile, pairwise disjoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metasae.io import atomic_path

N_QUINTILES = 5


# ---------------------------------------------------------------------------
# Sparse firings
# ---------------------------------------------------------------------------


@dataclass
class Firings:
    """Firings of selected latents, grouped by latent (CSR layout).

    Firings of ``latents[j]`` are ``rows/pos/acts[ptr[j]:ptr[j+1]]``, sorted by (row, pos).
    """

    latents: np.ndarray  # (L,) int64
    ptr: np.ndarray  # (L+1,) int64
    rows: np.ndarray  # int32
    pos: np.ndarray  # int32
    acts: np.ndarray  # float32 pre-activations (> theta)
    n_rows: int
    n_pos: int
    fingerprint: str = ""

    def of(self, latent: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        j = int(np.searchsorted(self.latents, latent))
        if j >= len(self.latents) or self.latents[j] != latent:
            raise KeyError(f"latent {latent} was not collected")
        s, e = self.ptr[j], self.ptr[j + 1]
        return self.rows[s:e], self.pos[s:e], self.acts[s:e]

    def count(self, latent: int) -> int:
        return len(self.of(latent)[0])

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, latents=self.latents, ptr=self.ptr, rows=self.rows, pos=self.pos, acts=self.acts,
                     n_rows=np.int64(self.n_rows), n_pos=np.int64(self.n_pos),
                     fingerprint=np.array(self.fingerprint))

    @classmethod
    def load(cls, path: str | Path) -> "Firings":
        with np.load(path) as z:
            return cls(latents=z["latents"], ptr=z["ptr"], rows=z["rows"], pos=z["pos"], acts=z["acts"],
                       n_rows=int(z["n_rows"]), n_pos=int(z["n_pos"]), fingerprint=str(z["fingerprint"]))


def _fingerprint(thresholds_F: np.ndarray, latents: np.ndarray, shape: tuple[int, ...]) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(thresholds_F, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(latents, dtype=np.int64).tobytes())
    h.update(repr(tuple(shape)).encode())
    return h.hexdigest()[:16]


def _np(x: Any) -> np.ndarray:
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_float32_tensor(x: Any):
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def collect_firings(sae: Any, thresholds_F: Any, acts_RTD: Any, mask_RT: Any, latents: Sequence[int] | None = None,
                    chunk_rows: int = 64, path: str | Path | None = None, progress: bool = False) -> Firings:
    """Stream ``acts_RTD`` in row chunks; keep (row, pos, pre-act) where pre > theta and mask.

    Never materialises an (R*T, n) matrix: each chunk holds at most
    ``chunk_rows * T`` x n pre-activations.  With ``path``, a saved result with
    the same thresholds, latents and shape is reused, and a new one is saved.
    """
    import torch

    n = int(sae.cfg.n_latents)
    thr = _np(thresholds_F).astype(np.float32)
    lat = np.arange(n, dtype=np.int64) if latents is None else np.unique(np.asarray(latents, dtype=np.int64))
    R, T = int(acts_RTD.shape[0]), int(acts_RTD.shape[1])
    fp = _fingerprint(thr, lat, tuple(acts_RTD.shape))
    if path is not None and Path(path).is_file():
        old = Firings.load(path)
        if old.fingerprint == fp:
            return old
    thr_L = torch.from_numpy(thr[lat])
    lat_t = torch.from_numpy(lat)
    mask = _np(mask_RT).astype(bool)
    parts: list[tuple[np.ndarray, ...]] = []
    it = range(0, R, chunk_rows)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="firings", unit="chunk")
    for r0 in it:
        r1 = min(R, r0 + chunk_rows)
        x = _to_float32_tensor(acts_RTD[r0:r1]).reshape(-1, acts_RTD.shape[2])
        with torch.no_grad():
            pre = sae.pre_acts(x).float()
        if latents is not None:
            pre = pre[:, lat_t]
        fire = pre > thr_L
        fire &= torch.from_numpy(mask[r0:r1].reshape(-1, 1))
        b, j = fire.nonzero(as_tuple=True)
        if len(b) == 0:
            continue
        vals = pre[b, j].numpy().astype(np.float32)
        b_np = b.numpy()
        parts.append((j.numpy().astype(np.int64), (r0 + b_np // T).astype(np.int32),
                      (b_np % T).astype(np.int32), vals))
    if parts:
        j_all, r_all, p_all, v_all = (np.concatenate(c) for c in zip(*parts))
    else:
        j_all, r_all, p_all, v_all = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
                                      np.zeros(0, np.float32))
    order = np.lexsort((p_all, r_all, j_all))
    j_all, r_all, p_all, v_all = j_all[order], r_all[order], p_all[order], v_all[order]
    ptr = np.zeros(len(lat) + 1, dtype=np.int64)
    np.cumsum(np.bincount(j_all, minlength=len(lat)), out=ptr[1:])
    out = Firings(latents=lat, ptr=ptr, rows=r_all, pos=p_all, acts=v_all, n_rows=R, n_pos=T, fingerprint=fp)
    if path is not None:
        out.save(path)
    return out


# ---------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------


@dataclass
class Example:
    """One context window of one latent."""

    row: int
    end: int
    """Position of the window's last token: the firing token for explanation and simulation
    examples; for fuzz/detection examples the end of the grid chunk that holds it."""
    tokens: list[str]
    acts: np.ndarray
    """The latent's activation per window token (pre-act where it fires, else 0)."""
    activation: float
    """Activation of the sampled firing (0 for non-activating examples)."""
    quintile: int = -1
    """0 = top quintile ... 4 = bottom; -1 for non-activating examples."""
    strength: int = 0
    """Activation normalised 0-10 against the latent's maximum (explanation set)."""

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "end": self.end, "tokens": self.tokens, "acts": [float(a) for a in self.acts],
                "activation": float(self.activation), "quintile": self.quintile, "strength": self.strength}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Example":
        return cls(row=d["row"], end=d["end"], tokens=list(d["tokens"]), acts=np.asarray(d["acts"], np.float32),
                   activation=d["activation"], quintile=d["quintile"], strength=d["strength"])


@dataclass
class LatentContexts:
    latent: int
    explain: list[Example] = field(default_factory=list)
    simulation: list[Example] = field(default_factory=list)
    activating: list[Example] = field(default_factory=list)
    """Held-out activating examples for fuzz and detection."""
    non_activating: list[Example] = field(default_factory=list)
    max_activation: float = 0.0
    n_firings: int = 0
    n_eligible: int = 0
    skip_reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.skip_reason

    def to_dict(self) -> dict[str, Any]:
        ex = lambda xs: [e.to_dict() for e in xs]  # noqa: E731
        return {"latent": self.latent, "explain": ex(self.explain), "simulation": ex(self.simulation),
                "activating": ex(self.activating), "non_activating": ex(self.non_activating),
                "max_activation": self.max_activation, "n_firings": self.n_firings,
                "n_eligible": self.n_eligible, "skip_reason": self.skip_reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentContexts":
        ex = lambda xs: [Example.from_dict(e) for e in xs]  # noqa: E731
        return cls(latent=d["latent"], explain=ex(d["explain"]), simulation=ex(d["simulation"]),
                   activating=ex(d["activating"]), non_activating=ex(d["non_activating"]),
                   max_activation=d["max_activation"], n_firings=d["n_firings"], n_eligible=d["n_eligible"],
                   skip_reason=d["skip_reason"])


def spread(n: int, k: int = N_QUINTILES) -> list[int]:
    """``n`` items over ``k`` quintiles, the remainder going to the top ones first."""
    return [n // k + (1 if q < n % k else 0) for q in range(k)]


def quintiles(acts: np.ndarray) -> list[np.ndarray]:
    """Indices of ``acts`` sorted by decreasing activation, cut into 5 quintiles (0 = top)."""
    order = np.argsort(-np.asarray(acts), kind="stable")
    return np.array_split(order, N_QUINTILES)


class TokenStrings:
    """Readable per-token strings (``decode`` of each id), memoised."""

    def __init__(self, tokenizer: Any = None, table: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = dict(table or {})

    def __call__(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            s = self._cache.get(i)
            if s is None:
                s = self.tokenizer.decode([i]) if self.tokenizer is not None else f"<{i}>"
                self._cache[i] = s
            out.append(s)
        return out


def window_activations(sae: Any, theta: float, latent: int, acts_RTD: Any, mask_RT: np.ndarray,
                       windows: Sequence[tuple[int, int]], window: int) -> np.ndarray:
    """The latent's activation on every token of each (row, end) window: (n_windows, window).

    Recomputed through ``sae.pre_acts`` so that highlighting sees the whole
    window, not only the recorded firing token.  Non-firing and masked tokens are 0.
    """
    import torch

    if not windows:
        return np.zeros((0, window), np.float32)
    xs = [_to_float32_tensor(acts_RTD[r, e - window + 1:e + 1]) for r, e in windows]
    x = torch.stack(xs).reshape(len(windows) * window, -1)
    with torch.no_grad():
        pre = sae.pre_acts(x)[:, latent].float().reshape(len(windows), window).numpy()
    m = np.stack([mask_RT[r, e - window + 1:e + 1] for r, e in windows]).astype(bool)
    return np.where((pre > theta) & m, pre, 0.0).astype(np.float32)


def requirement(cfg: Any) -> list[int]:
    """Firings needed per quintile (0 = top): explanation + simulation + fuzz/detection."""
    fz = spread(cfg.n_fuzz_examples)
    return [(cfg.n_explain_top if q == 0 else cfg.n_explain_per_lower) + cfg.n_sim_per_quintile + fz[q]
            for q in range(N_QUINTILES)]


def grid_end(t: int, window: int, row_len: int) -> int:
    """Last position of the grid chunk of ``window`` tokens that holds position ``t`` of a row
    (chunks start at multiples of ``window``; a row's tail shorter than a window is covered by
    the chunk that ends at the row's end)."""
    start = min((t // window) * window, row_len - window)
    return start + window - 1


def build_latent_contexts(latent: int, firings: Firings, tokens_RT: Any, cfg: Any, rng: np.random.Generator, *,
                          sae: Any, acts_RTD: Any, thresholds_F: Any, mask_RT: Any = None,
                          token_strings: TokenStrings | None = None, max_tries: int = 200,
                          window_acts: Any = None) -> LatentContexts:
    """The paper's context sets for one latent (paper-notes 5.2), or a skipped record with the reason.

    * eligible firings: positions t >= window - 1 (a full window ends at the firing token);
    * 5 quintiles by decreasing activation;
    * explanation: ``n_explain_top`` from the top quintile + ``n_explain_per_lower`` from each other,
      strengths round(10 * a / max_a) with max_a the latent's largest eligible activation;
    * simulation: ``n_sim_per_quintile`` per quintile, disjoint from the explanation set, shuffled;
    * fuzz/detection: ``n_fuzz_examples`` activating (spread over quintiles, disjoint from both)
      with per-token activations, and as many random windows where the latent never fires.
      Both are chunks of one fixed grid of ``window`` tokens per row (as delphi's), so the
      firing token sits wherever it falls in its chunk: a window that always ended at the
      firing token would tell a judge the label by the position of the highlight alone.

    ``window_acts(windows) -> (n, window)`` replaces the SAE for the per-token activations
    of the fuzz windows (the validation set's synthetic latents have no SAE).
    """
    W = int(cfg.window)
    rows, pos, vals = firings.of(latent)
    R, T = int(tokens_RT.shape[0]), int(tokens_RT.shape[1])
    out = LatentContexts(latent=latent, n_firings=len(rows))
    if W > T:
        out.skip_reason = f"window ({W}) is longer than a row ({T} tokens)"
        return out
    elig = np.nonzero(pos >= W - 1)[0]
    out.n_eligible = len(elig)
    need = requirement(cfg)
    qs = quintiles(vals[elig]) if len(elig) >= N_QUINTILES else []
    short = [q for q in range(N_QUINTILES) if not qs or len(qs[q]) < need[q]]
    if short:
        out.skip_reason = (f"too few firings: {len(elig)} eligible of {len(rows)} (need about "
                           f"{N_QUINTILES * max(need)}, {need[0]} in the top quintile)")
        return out
    tokens = _np(tokens_RT)
    mask = np.ones((R, T), bool) if mask_RT is None else _np(mask_RT).astype(bool)
    theta = float(_np(thresholds_F)[latent]) if thresholds_F is not None else 0.0
    strings = token_strings or TokenStrings()
    max_a = float(vals[elig].max())
    out.max_activation = max_a
    fz = spread(cfg.n_fuzz_examples)
    sel_explain, sel_sim, sel_fuzz = [], [], []
    for q in range(N_QUINTILES):
        pick = elig[rng.permutation(qs[q])[:need[q]]]
        n_ex = cfg.n_explain_top if q == 0 else cfg.n_explain_per_lower
        sel_explain += [(i, q) for i in pick[:n_ex]]
        sel_sim += [(i, q) for i in pick[n_ex:n_ex + cfg.n_sim_per_quintile]]
        sel_fuzz += [(i, q) for i in pick[n_ex + cfg.n_sim_per_quintile:]]

    def ex(i: int, q: int, acts_w: np.ndarray | None = None) -> Example:
        r, e, a = int(rows[i]), int(pos[i]), float(vals[i])
        win_acts = acts_w if acts_w is not None else np.zeros(W, np.float32)
        if acts_w is None:
            win_acts[-1] = a
        return Example(row=r, end=e, tokens=strings(tokens[r, e - W + 1:e + 1]), acts=win_acts, activation=a,
                       quintile=q, strength=int(round(10.0 * a / max_a)) if max_a > 0 else 0)

    out.explain = sorted((ex(i, q) for i, q in sel_explain), key=lambda e: -e.activation)
    sim = [ex(i, q) for i, q in sel_sim]
    out.simulation = [sim[j] for j in rng.permutation(len(sim))]

    # Non-activating windows: random (row, end) with no firing of the latent inside.
    by_row: dict[int, np.ndarray] = {}
    for r in np.unique(rows):
        by_row[int(r)] = pos[rows == r]
    non: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    tries = 0
    n_chunks = -(-T // W)
    while len(non) < cfg.n_fuzz_examples and tries < max_tries * max(1, cfg.n_fuzz_examples):
        tries += 1
        r, e = int(rng.integers(R)), grid_end(int(rng.integers(n_chunks)) * W, W, T)
        if (r, e) in seen or not mask[r, e]:
            continue
        p = by_row.get(r)
        if p is not None and np.any((p >= e - W + 1) & (p <= e)):
            continue
        seen.add((r, e))
        non.append((r, e))
    if len(non) < cfg.n_fuzz_examples:
        out.skip_reason = f"found only {len(non)} of {cfg.n_fuzz_examples} non-activating windows"
        return out

    act_windows = [(int(rows[i]), grid_end(int(pos[i]), W, T)) for i, _ in sel_fuzz]
    wa = (window_acts(act_windows) if window_acts is not None
          else window_activations(sae, theta, latent, acts_RTD, mask, act_windows, W))
    out.activating = []
    for j, (i, q) in enumerate(sel_fuzz):
        r, e = act_windows[j]
        a = float(vals[i])
        out.activating.append(Example(row=r, end=e, tokens=strings(tokens[r, e - W + 1:e + 1]), acts=wa[j],
                                      activation=a, quintile=q,
                                      strength=int(round(10.0 * a / max_a)) if max_a > 0 else 0))
    out.non_activating = [Example(row=r, end=e, tokens=strings(tokens[r, e - W + 1:e + 1]),
                                  acts=np.zeros(W, np.float32), activation=0.0, quintile=-1, strength=0)
                          for r, e in non]
    return out


def build_all_contexts(latents: Sequence[int], firings: Firings, tokens_RT: Any, cfg: Any, seed: int, *,
                       sae: Any, acts_RTD: Any, thresholds_F: Any, mask_RT: Any = None,
                       tokenizer: Any = None) -> dict[int, LatentContexts]:
    """:func:`build_latent_contexts` for each latent with a per-latent generator (order-independent)."""
    strings = TokenStrings(tokenizer)
    return {int(i): build_latent_contexts(int(i), firings, tokens_RT, cfg, np.random.default_rng([seed, int(i)]),
                                          sae=sae, acts_RTD=acts_RTD, thresholds_F=thresholds_F, mask_RT=mask_RT,
                                          token_strings=strings)
            for i in latents}


def example_text(ex: Example, mark_final: bool = False, newline: str = "\\n") -> str:
    """The window as one line of text; with ``mark_final`` the last token is wrapped in << >>."""
    toks = [t.replace("\n", newline) for t in ex.tokens]
    if mark_final and toks:
        toks[-1] = f"<<{toks[-1]}>>"
    return "".join(toks)


__all__ = ["Firings", "Example", "LatentContexts", "TokenStrings", "collect_firings", "build_latent_contexts",
           "build_all_contexts", "window_activations", "quintiles", "spread", "requirement", "example_text", "grid_end",
           "N_QUINTILES"]

