"""The activation cache: harvest once, train and evaluate many times.

One token stream is cut into consecutive, disjoint row ranges for the splits
``train``, ``calib`` (EER thresholds), ``phi`` (co-firing, reconstruction, CE)
and ``autointerp`` (SPEC section 2), sized from ``DataConfig`` in tokens and
rounded up to whole rows.  For each split the cache holds

* ``tokens_<split>.i32``  R x T int32 token ids,
* ``mask_<split>.u8``     R x T valid positions (not BOS / padding),
* ``acts_<split>_<i>.bin`` shards of R_i x T x D resid_pre activations in 16-bit
  (bfloat16 stored as its raw uint16 bits, or float16),

and ``manifest.json`` records the model, site, dtype, token ranges, shapes and
every file's sha256 and size.  The manifest is rewritten atomically after each
shard, so a killed build resumes where it stopped (finished shards are kept, a
partial one is rebuilt).  Reads are memory-mapped.

The trainer reads ``iter_batches``: a shuffle over the valid positions of a
split that depends only on (seed, epoch), and that resumes at ``start_batch``
without touching the skipped data, so a run killed with -9 sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from metasae.activations.corpus import (
    CORPUS_VERSION, SHUFFLE_SEED, load_documents, rows_for_tokens, split_row_ranges, tokenize_rows, valid_mask)
from metasae.io import IntegrityError, atomic_path, atomic_write_json, read_json, sha256_file, verify_file

SPLITS = ("train", "calib", "phi", "autointerp")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _rebuild_hint(profile_name: str) -> str:
    return f"delete it and rerun `bash run_all.sh --profile {profile_name}`"


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def build_cache(profile: Any, out_dir: Path, progress: bool = True, documents: Sequence[str] | None = None,
                loaded: Any = None, model_source: Callable[[], Any] | None = None) -> "ActivationCache":
    """Tokenise the profile's corpus once and harvest resid_pre for every cached split.

    Idempotent and resumable shard by shard.  ``documents`` replaces the corpus
    (tests, notebooks); ``loaded`` reuses an already loaded model, ``model_source``
    returns one when it is first needed (the pipeline's per-process model).  The
    returned cache harvests its streamed splits with the same model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mcfg, dcfg = profile.model, profile.data
    key = {
        "format": FORMAT_VERSION,
        "model": mcfg.name, "hub_id": mcfg.hub_id, "layer": mcfg.layer, "model_dtype": mcfg.dtype,
        "cache_dtype": dcfg.cache_dtype, "ctx_len": dcfg.ctx_len,
        "corpus": "<documents given>" if documents is not None else dcfg.corpus,
        "corpus_builder": CORPUS_VERSION,
        **({"streamed": sorted(dcfg.stream_splits)} if dcfg.stream_splits else {}),
        "corpus_shuffle_seed": SHUFFLE_SEED,
        "split_tokens": {s: getattr(dcfg, f"{s}_tokens") for s in SPLITS},
        "shard_tokens": dcfg.shard_tokens,
    }
    man_path = out_dir / MANIFEST
    manifest = read_json(man_path) if man_path.is_file() else None
    if manifest is not None and manifest.get("key") != key:
        diff = sorted(k for k in key if manifest.get("key", {}).get(k) != key[k])
        raise IntegrityError(
            f"the activation cache in {out_dir} was built with other settings ({', '.join(diff)}); "
            f"delete that folder and rerun `bash run_all.sh --profile {profile.name}`")

    def get_loaded() -> Any:
        nonlocal loaded
        if loaded is None and model_source is not None:
            loaded = model_source()
        if loaded is None:
            from metasae.activations.models import load_model

            loaded = load_model(mcfg.name, dtype=mcfg.dtype, hub_id=mcfg.hub_id,
                                trust_remote_code=mcfg.trust_remote_code)
        return loaded

    if manifest is None or not _token_files_ok(out_dir, manifest):
        if manifest is not None:
            _say(f"activation cache {out_dir}: token or mask files missing or damaged; re-tokenising "
                 "(finished activation shards of unchanged tokens are kept)")
        manifest = _tokenise(profile, out_dir, key, documents, get_loaded(), manifest)
        atomic_write_json(man_path, manifest)

    pending = [(s, i) for s in SPLITS for i, sh in enumerate(manifest["splits"][s]["shards"])
               if not _shard_done(out_dir, sh)]
    for s, i in pending:
        sh = manifest["splits"][s]["shards"][i]
        if sh.get("sha256"):  # it was finished once: say what was found and what is rebuilt
            p = out_dir / sh["file"]
            found = f"truncated ({p.stat().st_size:,} of {sh['size']:,} bytes)" if p.is_file() else "missing"
            _say(f"activation cache {out_dir}: {sh['file']} ({s} split) is {found}; "
                 f"re-harvesting its {_shard_rows(sh) * manifest['ctx_len']:,} tokens")
    if pending:
        lm = get_loaded()
        from metasae.activations.harvest import check_site

        check_site(lm, mcfg.layer, dcfg.ctx_len)
        total = sum(_shard_rows(manifest["splits"][s]["shards"][i]) for s, i in pending) * dcfg.ctx_len
        bar = _progress(total, f"harvest {mcfg.name} L{mcfg.layer}", progress)
        t0 = time.perf_counter()
        for split, i in pending:
            info = manifest["splits"][split]
            sh = info["shards"][i]
            a, b = sh["rows"]
            tok = torch.from_numpy(_read_i32(out_dir / info["tokens_file"]["file"], manifest["ctx_len"])[a:b].astype(np.int64))
            msk = torch.from_numpy(_read_u8(out_dir / info["mask_file"]["file"], manifest["ctx_len"])[a:b].astype(bool))
            path = out_dir / sh["file"]
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    for _, acts in _harvest_checked(lm, mcfg.layer, tok, msk, dcfg.harvest_batch_rows,
                                                    _torch_cache_dtype(dcfg.cache_dtype),
                                                    f"split {split} shard {i} ({path.name}) of {mcfg.name}"):
                        fh.write(_to_bytes(acts))
                        if bar is not None:
                            bar.update(acts.shape[0] * acts.shape[1])
            sh["sha256"] = sha256_file(path)
            sh["size"] = path.stat().st_size
            manifest["harvest_seconds"] = manifest.get("harvest_seconds", 0.0) + (time.perf_counter() - t0)
            t0 = time.perf_counter()
            atomic_write_json(man_path, manifest)
        if bar is not None:
            bar.close()
    cache = ActivationCache(out_dir, profile_name=profile.name)
    cache.model_source, cache.harvest_rows = get_loaded, dcfg.harvest_batch_rows
    return cache


def _harvest_checked(lm: Any, layer: int, tokens_RT: torch.Tensor, mask_RT: torch.Tensor, batch_rows: int,
                     dtype: torch.dtype, what: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows x T x D in ``dtype`` on the CPU) for successive harvest batches of the rows;
    non-finite values at valid positions are refused in one sentence naming ``what``."""
    from metasae.activations.harvest import harvest_rows

    r0 = 0
    for acts in harvest_rows(lm, layer, tokens_RT, None, batch_rows):
        acts = acts.to("cpu", dtype)
        if not torch.isfinite(acts[mask_RT[r0:r0 + acts.shape[0]]].float()).all():
            raise FloatingPointError(f"non-finite activations while harvesting {what} layer {layer}; "
                                     "try model.dtype = 'float32'")
        yield r0, acts
        r0 += acts.shape[0]


def _say(message: str) -> None:
    """One line on stderr (visible in a notebook's output and in the terminal)."""
    print(f"[metasae] {message}", file=sys.stderr, flush=True)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, smoothing=0.1)


def _tokenise(profile: Any, out_dir: Path, key: dict, documents: Sequence[str] | None, lm: Any,
              old: dict | None) -> dict:
    dcfg = profile.data
    ctx = dcfg.ctx_len
    from metasae.activations.harvest import check_site

    check_site(lm, profile.model.layer, ctx)
    sizes = {s: getattr(dcfg, f"{s}_tokens") for s in SPLITS}
    ranges = split_row_ranges(sizes, ctx)
    n_rows = max(b for _, b in ranges.values())
    if documents is None:
        docs = load_documents(dcfg.corpus) if dcfg.corpus != "fineweb" else _fineweb_docs()
        corpus_name = dcfg.corpus
    else:
        docs = [d for d in documents if d and d.strip()]
        corpus_name = "<documents given>"
        if not docs:
            raise ValueError("the corpus is empty: no non-empty documents were given")
    tokens = tokenize_rows(docs, lm.tokenizer, ctx, n_rows, bos_token_id=lm.bos_token_id)
    if tokens.shape[0] < n_rows:
        have = tokens.shape[0] * ctx
        raise ValueError(
            f"corpus {corpus_name} yields only {have:,} tokens ({tokens.shape[0]} rows of {ctx}) but the splits ask for "
            f"{n_rows * ctx:,} ({', '.join(f'{s} {n:,}' for s, n in sizes.items())}); lower the data.*_tokens settings")
    mask = valid_mask(tokens, lm.bos_token_id)
    rows_per_shard = max(1, dcfg.shard_tokens // ctx)
    d = lm.spec.d_model
    itemsize = 2
    splits: dict[str, Any] = {}
    for s, (a, b) in ranges.items():
        t = tokens[a:b].numpy().astype(np.int32)
        m = mask[a:b].numpy().astype(np.uint8)
        tf, mf = f"tokens_{s}.i32", f"mask_{s}.u8"
        for name, arr in ((tf, t), (mf, m)):
            with atomic_path(out_dir / name) as tmp:
                arr.tofile(tmp)
        shards = []  # none for a streamed split: its activations are harvested while training
        for j, r in enumerate(range(0, b - a, rows_per_shard) if s not in dcfg.stream_splits else ()):
            r1 = min(r + rows_per_shard, b - a)
            shards.append({"file": f"acts_{s}_{j:04d}.bin", "rows": [r, r1], "shape": [r1 - r, ctx, d],
                           "expected_size": (r1 - r) * ctx * d * itemsize, "sha256": None, "size": None})
        splits[s] = {
            "stream_rows": [a, b], "stream_tokens": [a * ctx, b * ctx], "tokens_requested": sizes[s],
            "rows": b - a, "valid_tokens": int(m.sum()),
            "tokens_file": {"file": tf, "sha256": sha256_file(out_dir / tf), "size": (out_dir / tf).stat().st_size},
            "mask_file": {"file": mf, "sha256": sha256_file(out_dir / mf), "size": (out_dir / mf).stat().st_size},
            "shards": shards,
        }
        if old is not None:  # same tokens as before: finished shards stay valid
            prev = old.get("splits", {}).get(s, {})
            if prev.get("tokens_file", {}).get("sha256") == splits[s]["tokens_file"]["sha256"]:
                for sh, psh in zip(shards, prev.get("shards", [])):
                    if psh.get("rows") == sh["rows"] and psh.get("sha256"):
                        sh["sha256"], sh["size"] = psh["sha256"], psh["size"]
    tk = lm.tokenizer
    return {
        "key": key,
        "profile": profile.name,
        "model": profile.model.name,
        "hub_id": profile.model.hub_id or lm.spec.hub_id,
        "layer": profile.model.layer,
        "site": f"resid_pre of block {profile.model.layer} (HF hidden_states[{profile.model.layer}])",
        "model_dtype": profile.model.dtype,
        "dtype": dcfg.cache_dtype,
        "d": d,
        "ctx_len": ctx,
        "corpus": corpus_name,
        "corpus_shuffle_seed": SHUFFLE_SEED,
        "tokenizer": {"class": type(tk).__name__, "name_or_path": str(getattr(tk, "name_or_path", "")),
                      "vocab_size": len(tk)},
        "bos_token_id": lm.bos_token_id,
        "masking": "BOS positions (row starts and document boundaries) are excluded",
        "splits": splits,
    }


def _fineweb_docs() -> Iterator[str]:
    from metasae.activations.corpus import iter_documents

    return iter_documents("fineweb")


def _token_files_ok(out_dir: Path, manifest: dict) -> bool:
    try:
        for s in SPLITS:
            for k in ("tokens_file", "mask_file"):
                f = manifest["splits"][s][k]
                verify_file(out_dir / f["file"], f["sha256"], f["size"], "")
    except (IntegrityError, KeyError):
        return False
    return True


def _shard_done(out_dir: Path, sh: dict) -> bool:
    p = out_dir / sh["file"]
    return bool(sh.get("sha256")) and p.is_file() and p.stat().st_size == sh["size"]


def _shard_rows(sh: dict) -> int:
    return sh["rows"][1] - sh["rows"][0]


def _torch_cache_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _to_bytes(acts: torch.Tensor) -> bytes:
    return acts.contiguous().view(torch.int16).numpy().tobytes()


def _memmap(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    # copy-on-write: torch may wrap it without a read-only warning, and the file never changes
    return np.memmap(path, dtype=dtype, mode="c", shape=shape)


def _read_i32(path: Path, ctx: int) -> np.ndarray:
    n = path.stat().st_size // 4
    return _memmap(path, np.int32, (n // ctx, ctx))


def _read_u8(path: Path, ctx: int) -> np.ndarray:
    n = path.stat().st_size
    return _memmap(path, np.uint8, (n // ctx, ctx))


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class ShardedActs:
    """A split's R x T x D activations across shards, indexed by row like one array.

    ``acts[i]``, ``acts[a:b]``, ``acts[rows]`` (a sequence or tensor of row
    indices) and ``acts[rows, positions]`` return float32 torch tensors; only the
    touched rows are read from the memory-mapped shards.
    """

    def __init__(self, cache: "ActivationCache", split: str):
        self.cache, self.split = cache, split
        info = cache.manifest["splits"][split]
        self.shards = info["shards"]
        self.starts = np.array([sh["rows"][0] for sh in self.shards] + [info["rows"]], dtype=np.int64)
        self.shape = (info["rows"], cache.ctx_len, cache.d)

    def __len__(self) -> int:
        return self.shape[0]

    def shard_array(self, j: int) -> np.ndarray:
        return self.cache._shard(self.split, j)

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        out = np.empty((len(rows), self.shape[1], self.shape[2]), dtype=np.uint16)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            out[sel] = self.shard_array(int(j))[rows[sel] - self.starts[j]]
        return self.cache._to_float(out)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        pos = None
        if isinstance(idx, tuple):
            idx, pos = idx
        if isinstance(idx, slice):
            rows = np.arange(*idx.indices(self.shape[0]))
        elif isinstance(idx, (int, np.integer)):
            rows = np.array([int(idx) % self.shape[0]])
        else:
            rows = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        x = self._rows(rows)
        if isinstance(pos, slice):
            x = x[:, pos]
        elif pos is not None:
            p = torch.as_tensor(pos)
            x = x[torch.arange(len(rows)), p] if p.ndim and len(p) == len(rows) else x[:, p]
        if isinstance(idx, (int, np.integer)):
            x = x[0]
        return x


def massive_variance_stats(chunks: Iterable[torch.Tensor], massive: np.ndarray) -> tuple[float, torch.Tensor]:
    """One pass over a split's valid activations (``chunks``, stream order) with ``massive`` the
    per-position flags: (share of the raw variance about the split's mean held by the flagged
    positions, their mean squared value per dimension).  Sums in float64, so a split that does not
    fit in memory (a paper profile's phi split) is summarised as one that does."""
    flags = torch.from_numpy(np.asarray(massive, dtype=bool))
    s = sm = q_m = dim = None
    q, n, off = 0.0, 0, 0
    for x in chunks:
        x = x.double()
        f = flags[off:off + x.shape[0]]
        off += x.shape[0]
        if f.shape[0] != x.shape[0]:
            raise ValueError(f"{len(flags)} flags for more positions ({off})")
        xm = x[f]
        s = x.sum(0) if s is None else s + x.sum(0)
        sm = xm.sum(0) if sm is None else sm + xm.sum(0)
        sq = xm.pow(2).sum(0)
        dim = sq if dim is None else dim + sq
        q += float(x.pow(2).sum())
        q_m = float(sq.sum()) + (q_m or 0.0)
        n += x.shape[0]
    if off != len(flags):
        raise ValueError(f"{len(flags)} flags for {off} positions")
    n_m = int(flags.sum())
    if n == 0 or n_m == 0:
        return 0.0, torch.zeros(0 if s is None else s.shape[0])
    mu = s / n
    total = q - n * float(mu @ mu)  # sum ||x - mu||^2
    held = q_m - 2.0 * float(mu @ sm) + n_m * float(mu @ mu)
    return (held / total if total > 0 else 0.0), (dim / n_m).float()


class ResidentActs(ShardedActs):
    """A streamed split's activations held in memory (cache dtype), indexed as :class:`ShardedActs`."""

    def __init__(self, cache: "ActivationCache", split: str, acts_RTD: torch.Tensor):
        self.cache, self.split, self.acts = cache, split, acts_RTD
        self.shape = tuple(acts_RTD.shape)

    def _rows(self, rows: np.ndarray) -> torch.Tensor:
        return self.acts[torch.from_numpy(np.asarray(rows, dtype=np.int64))].float()


def _rechunk(parts: Iterator[torch.Tensor], chunk_tokens: int) -> Iterator[torch.Tensor]:
    """The rows of ``parts`` (n_i x D each) regrouped into chunks of exactly ``chunk_tokens`` (the last shorter).

    A chunk inside one part is a view of it (no copy); only a chunk that spans parts is concatenated."""
    buf: list[torch.Tensor] = []
    n = 0
    for x in parts:
        start = 0
        if n:  # complete the chunk begun in earlier parts
            need = chunk_tokens - n
            if x.shape[0] < need:
                buf.append(x)
                n += x.shape[0]
                continue
            yield torch.cat([*buf, x[:need]])
            buf, n, start = [], 0, need
        while x.shape[0] - start >= chunk_tokens:
            yield x[start:start + chunk_tokens]
            start += chunk_tokens
        if start < x.shape[0]:
            buf, n = [x[start:]], x.shape[0] - start
    if n:
        yield torch.cat(buf) if len(buf) > 1 else buf[0]


@dataclass
class _Flat:
    index: np.ndarray  # flat (row * T + pos) indices of the valid positions, ascending


class ActivationCache:
    """Memory-mapped reader of a built cache (see the module docstring)."""

    def __init__(self, out_dir: Path, profile_name: str = "NAME"):
        self.dir = Path(out_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise IntegrityError(f"{path} is missing; build the cache with `bash run_all.sh --profile {profile_name}`")
        self.manifest = read_json(path)
        self.profile_name = self.manifest.get("profile", profile_name)
        self.ctx_len = int(self.manifest["ctx_len"])
        self.d = int(self.manifest["d"])
        self.dtype = self.manifest["dtype"]
        self._shards: dict[tuple[str, int], np.ndarray] = {}
        self._flat: dict[tuple[str, float], _Flat] = {}
        self._norms: dict[str, np.ndarray] = {}
        self._resident: dict[str, "ResidentActs"] = {}
        self.model_source: Callable[[], Any] | None = None
        """Returns the loaded model that harvests a streamed split (set by :func:`build_cache`)."""
        self.harvest_rows = 16
        """Rows per forward when harvesting a streamed split (``data.harvest_batch_rows``)."""
        missing = [sh["file"] for s in SPLITS for sh in self.manifest["splits"][s]["shards"] if not sh.get("sha256")]
        if missing:
            raise IntegrityError(f"the activation cache in {self.dir} is incomplete ({len(missing)} shards missing, "
                                 f"first {missing[0]}); rerun `bash run_all.sh --profile {self.profile_name}`")

    # -- files --------------------------------------------------------
    def _shard(self, split: str, j: int) -> np.ndarray:
        key = (split, j)
        if key not in self._shards:
            sh = self.manifest["splits"][split]["shards"][j]
            path = self.dir / sh["file"]
            if not path.is_file() or path.stat().st_size != sh["size"]:
                raise IntegrityError(f"{path} is missing or truncated; {_rebuild_hint(self.profile_name)}")
            self._shards[key] = _memmap(path, np.uint16, tuple(sh["shape"]))
        return self._shards[key]

    def _to_float(self, arr_u16: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr_u16).view(np.int16))
        return t.view(_torch_cache_dtype(self.dtype)).float()

    def tokens(self, split: str) -> torch.Tensor:
        f = self.manifest["splits"][self._check(split)]["tokens_file"]["file"]
        return torch.from_numpy(_read_i32(self.dir / f, self.ctx_len))

    def mask(self, split: str) -> torch.Tensor:
        f = self.manifest["splits"][self._check(split)]["mask_file"]["file"]
        return torch.from_numpy(_read_u8(self.dir / f, self.ctx_len)).bool()

    def _check(self, split: str) -> str:
        if split not in self.manifest["splits"]:
            raise ValueError(f"unknown split {split!r}; the cache has {', '.join(self.manifest['splits'])}")
        return split

    def streamed(self, split: str) -> bool:
        """Is `split` streamed (token ids cached, activations harvested while training)?"""
        return split in self.manifest.get("key", {}).get("streamed", [])

    def _cached(self, split: str) -> str:
        if self.streamed(self._check(split)):
            raise ValueError(f"split {split!r} is streamed (data.stream_splits): its activations are not on disk; "
                             "read it with metasae.activations.stream")
        return split

    def n_valid(self, split: str) -> int:
        return int(self.manifest["splits"][self._check(split)]["valid_tokens"])

    def verify(self) -> None:
        """Check every file against the manifest (sizes and sha256)."""
        hint = _rebuild_hint(self.profile_name)
        for s in SPLITS:
            info = self.manifest["splits"][s]
            for k in ("tokens_file", "mask_file"):
                f = info[k]
                verify_file(self.dir / f["file"], f["sha256"], f["size"], hint)
            for sh in info["shards"]:
                if sh["size"] != sh["expected_size"]:
                    raise IntegrityError(f"{self.dir / sh['file']} has an inconsistent manifest entry; {hint}")
                verify_file(self.dir / sh["file"], sh["sha256"], sh["size"], hint)

    # -- positional access -------------------------------------------
    def split_arrays(self, split: str) -> tuple[ShardedActs, torch.Tensor, torch.Tensor]:
        """(acts_RTD, tokens_RT, mask_RT); acts are read lazily by row as float32.

        A streamed split (other than the training split) is harvested once per cache object
        into memory (rows x T x D in the cache's dtype, the values the shards would hold) and
        read from there: the autointerp split is read by position, not in order."""
        if self.streamed(self._check(split)) and split != "train":
            if split not in self._resident:
                out = torch.empty(int(self.manifest["splits"][split]["rows"]), self.ctx_len, self.d,
                                  dtype=_torch_cache_dtype(self.dtype))
                for r0, acts in self._harvest_batches(split):
                    out[r0:r0 + acts.shape[0]] = acts
                self._resident[split] = ResidentActs(self, split, out)
            return self._resident[split], self.tokens(split), self.mask(split)
        return ShardedActs(self, self._cached(split)), self.tokens(split), self.mask(split)

    def valid_acts(self, split: str, chunk_tokens: int = 65536) -> Iterator[torch.Tensor]:
        """Activations at valid positions, in stream order, in chunks of ``chunk_tokens`` x D.

        A streamed split (``data.stream_splits``, other than the training split) is harvested
        from the model (:attr:`model_source`) on every call, in the rows and batches the cache
        writer would have used and rounded to the cache's dtype: on the CPU its chunks equal the
        cached ones bitwise."""
        return _rechunk(self._streamed_rows(split) if self.streamed(self._check(split)) else self._cached_rows(split),
                        chunk_tokens)

    def _cached_rows(self, split: str, step_tokens: int = 65536) -> Iterator[torch.Tensor]:
        acts = ShardedActs(self, self._cached(split))
        mask = self.mask(split)
        step = max(1, step_tokens // self.ctx_len)
        for j, sh in enumerate(acts.shards):
            a, b = sh["rows"]
            for r in range(a, b, step):
                r1 = min(r + step, b)
                yield self._to_float(acts.shard_array(j)[r - a:r1 - a])[mask[r:r1]]

    def _streamed_rows(self, split: str) -> Iterator[torch.Tensor]:
        mask = self.mask(split)
        for r0, acts in self._harvest_batches(split):
            yield acts[mask[r0:r0 + acts.shape[0]]].float()

    def _harvest_batches(self, split: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows x T x D in the cache's dtype on the CPU) of a streamed split, harvested in
        the shards and batches the cache writer would use (on the CPU: its values, bitwise)."""
        if self.model_source is None:
            raise ValueError(f"split {split!r} is streamed (data.stream_splits): its activations are not on disk and "
                             "this cache was opened without a model to harvest them (open it through the pipeline)")
        lm = self.model_source()
        tokens, mask = self.tokens(split), self.mask(split)
        rows_per_shard = max(1, int(self.manifest["key"]["shard_tokens"]) // self.ctx_len)
        for a in range(0, tokens.shape[0], rows_per_shard):  # the writer's shards and harvest batches
            b = min(a + rows_per_shard, tokens.shape[0])
            for r0, acts in _harvest_checked(lm, int(self.manifest["layer"]), tokens[a:b].long(), mask[a:b],
                                             self.harvest_rows, _torch_cache_dtype(self.dtype),
                                             f"the streamed {split} split (rows {a}-{b - 1}) of {self.manifest['model']}"):
                yield a + r0, acts

    # -- massive activations -----------------------------------------------
    def token_norms(self, split: str) -> np.ndarray:
        """L2 norm of every valid position's activation, in stream order (float32; computed once)."""
        key = f"norms_{self._check(split)}"
        if key not in self._norms:
            self._norms[key] = np.concatenate(
                [x.norm(dim=1).numpy() for x in self.valid_acts(split, 65536)]).astype(np.float32)
        return self._norms[key]

    def norm_reference_split(self) -> str:
        """The split whose median token norm scales the massive-activation cut: the training
        split, or the calibration split when the training split is streamed."""
        return "calib" if self.streamed("train") else "train"

    def massive_norm(self, ratio: float) -> float:
        """The norm above which a token counts as a massive activation: ``ratio`` x the median
        token norm of :meth:`norm_reference_split` (``data.massive_norm_ratio``); +inf when
        ratio is 0."""
        if not ratio:
            return float("inf")
        return float(ratio * np.median(self.token_norms(self.norm_reference_split())))

    # -- shuffled training batches -------------------------------------
    def _flat_index(self, split: str, exclude_above: float = float("inf")) -> np.ndarray:
        key = (split, exclude_above)
        if key not in self._flat:
            m = self.mask(split).numpy().reshape(-1)
            idx = np.flatnonzero(m).astype(np.int64)
            if math.isfinite(exclude_above):
                idx = idx[self.token_norms(split) <= exclude_above]
            self._flat[key] = _Flat(idx)
        return self._flat[key].index

    def num_batches(self, split: str, batch_size: int, epochs: float = 1.0, drop_last: bool = True,
                    exclude_above: float = float("inf")) -> int:
        self._cached(split)
        n = self.n_valid(split) if not math.isfinite(exclude_above) else len(self._flat_index(split, exclude_above))
        total = int(math.floor(epochs * n))
        return total // batch_size if drop_last else -(-total // batch_size)

    def iter_batches(self, split: str, batch_size: int, seed: int, epochs: float = 1.0, start_batch: int = 0,
                     drop_last: bool = True, exclude_above: float = float("inf")) -> Iterator[torch.Tensor]:
        """Shuffled float32 B x D batches over the split's valid positions.

        Sample order = permutation(seed, epoch 0) ++ permutation(seed, epoch 1) ++ ...
        truncated at floor(epochs * N).  Batch b holds samples [b*B, (b+1)*B): it
        depends only on (seed, b), so ``start_batch`` resumes exactly, generating
        only the permutations it needs and reading no skipped activations.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        flat = self._flat_index(self._cached(split), exclude_above)
        n = len(flat)
        if n == 0:
            raise ValueError(f"split {split!r} has no valid positions")
        total = int(math.floor(epochs * n))
        nb = self.num_batches(split, batch_size, epochs, drop_last, exclude_above)
        acts = ShardedActs(self, split)
        perms: dict[int, np.ndarray] = {}

        def perm(e: int) -> np.ndarray:
            if e not in perms:
                if len(perms) > 1:
                    perms.clear()
                perms[e] = np.random.default_rng([int(seed), e]).permutation(n)
            return perms[e]

        for b in range(start_batch, nb):
            s0, s1 = b * batch_size, min((b + 1) * batch_size, total)
            parts = []
            s = s0
            while s < s1:
                e, off = divmod(s, n)
                take = min(s1 - s, n - off)
                parts.append(perm(e)[off:off + take])
                s += take
            idx = flat[np.concatenate(parts)]
            yield self._gather_flat(acts, idx)

    def _gather_flat(self, acts: ShardedActs, flat_idx: np.ndarray) -> torch.Tensor:
        T = self.ctx_len
        order = np.argsort(flat_idx, kind="stable")
        srt = flat_idx[order]
        rows = srt // T
        out = np.empty((len(srt), self.d), dtype=np.uint16)
        which = np.searchsorted(acts.starts, rows, side="right") - 1
        for j in np.unique(which):
            sel = which == j
            arr = acts.shard_array(int(j)).reshape(-1, self.d)
            out[sel] = arr[srt[sel] - acts.starts[j] * T]
        res = np.empty_like(out)
        res[order] = out
        return self._to_float(res)


def open_cache(out_dir: Path, profile_name: str = "NAME") -> ActivationCache:
    return ActivationCache(out_dir, profile_name)


def expected_rows(profile: Any) -> dict[str, int]:
    return {s: rows_for_tokens(getattr(profile.data, f"{s}_tokens"), profile.data.ctx_len) for s in SPLITS}


warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
