"""LLM clients for the explainer and the judge (SPEC 3.7).

One tiny interface, ``generate(messages, max_new_tokens, temperature,
want_logprobs) -> Completion``, with three implementations:

* :class:`HFLocalClient`: a local Hugging Face causal LM through its chat
  template (offline default: SmolLM2-135M-Instruct), greedy at temperature 0,
  first-token log-probabilities read from the logits;
* :class:`OpenAIClient`: an OpenAI-compatible ``/chat/completions`` endpoint
  (the paper served Qwen2.5-72B-Instruct-AWQ with vLLM), with timeouts and
  retries; after the last retry it raises :class:`LLMFailure`, which callers
  record as a missing score;
* :class:`CachedClient`: an on-disk cache in front of either, one JSON file per
  request, so a long run resumes and a rerun is reproducible.

The API key is read from the environment at request time only; it is never an
attribute, never part of a cache key, never written and never in a message.
"""

from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from metasae.autointerp.judges import JUDGE_MODELS, ensure_judge
from metasae.io import atomic_write_json

Messages = list[dict[str, str]]
MIN_SHARED_PREFIX = 16
"""Tokens the prompts of a batch must share before their prefix is encoded once."""
PREFIX_CACHES = 8
"""System prompts whose key/value caches a local judge remembers by default (one per scorer)."""


class LLMFailure(RuntimeError):
    """The backend gave no usable answer after every retry: record the item as missing."""


@dataclass
class Completion:
    text: str
    first_token_logprobs: dict[str, float] | None = None
    """Log-probabilities of the most likely first tokens (token string -> logprob)."""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "first_token_logprobs": self.first_token_logprobs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Completion":
        return cls(text=d["text"], first_token_logprobs=d.get("first_token_logprobs"))


class LLMClient(Protocol):
    backend_id: str
    model_id: str

    def generate(self, messages: Messages, max_new_tokens: int, temperature: float = 0.0,
                 want_logprobs: bool = False) -> Completion: ...

    def generate_batch(self, batch: Sequence[Messages], max_new_tokens: int, temperature: float = 0.0,
                       want_logprobs: bool = False) -> list[Completion | LLMFailure]: ...


def generate_each(client: Any, batch: Sequence[Messages], max_new_tokens: int, temperature: float = 0.0,
                  want_logprobs: bool = False) -> list[Completion | LLMFailure]:
    """``client.generate`` on one request at a time, failures returned in place."""
    out: list[Completion | LLMFailure] = []
    for messages in batch:
        try:
            out.append(client.generate(messages, max_new_tokens, temperature, want_logprobs))
        except LLMFailure as e:
            out.append(e)
    return out


def generate_batch(client: Any, batch: Sequence[Messages], max_new_tokens: int, temperature: float = 0.0,
                   want_logprobs: bool = False) -> list[Completion | LLMFailure]:
    """``client.generate_batch``, or one request at a time for a client without it."""
    gen = getattr(client, "generate_batch", None)
    if gen is None:
        return generate_each(client, batch, max_new_tokens, temperature, want_logprobs)
    return list(gen(batch, max_new_tokens, temperature, want_logprobs))


class _BatchByLoop:
    """Default ``generate_batch``: one request at a time, failures returned in place."""

    def generate_batch(self, batch: Sequence[Messages], max_new_tokens: int, temperature: float = 0.0,
                       want_logprobs: bool = False) -> list[Completion | LLMFailure]:
        return generate_each(self, batch, max_new_tokens, temperature, want_logprobs)


# ---------------------------------------------------------------------------
# Local Hugging Face model
# ---------------------------------------------------------------------------


class HFLocalClient(_BatchByLoop):
    """A local causal LM with its chat template.

    ``model`` is a packaged judge (:data:`metasae.autointerp.judges.JUDGE_MODELS`), a
    subject-model registry name (loaded with ``metasae.activations.models.load_model``),
    a local folder of safetensors weights, or an already loaded ``nn.Module`` (then
    ``tokenizer`` is required).  Prompts of one batch are left-padded together.  ``int8``
    (``autointerp.local_int8``) replaces the model's linear layers, but its output layer, by
    :class:`~metasae.autointerp.int8.Int8Linear` in place (a model object passed in included), but
    those whose names end with one of ``int8_keep``, and names it ``<model_id>+int8[-keep-...]``.
    """

    backend_id = "hf-local"

    def __init__(self, model: Any, tokenizer: Any = None, *, dtype: str = "bfloat16",
                 batch_size: int = 16, model_id: str | None = None, top_logprobs: int = 20,
                 always_logprobs: Sequence[str] = tuple("0123456789"), share_prefix: bool = True,
                 int8: bool = False, int8_keep: Sequence[str] = ()):
        import torch

        from metasae.allocator import keep_freed_memory

        keep_freed_memory()  # each generated token allocates the same blocks again (metasae.allocator)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("HFLocalClient: a tokenizer is required with a model object")
            self.model, self.tokenizer = model, tokenizer
            self.model_id = model_id or type(model).__name__
        elif Path(str(model)).is_dir() or str(model) in JUDGE_MODELS:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = ensure_judge(str(model)) if str(model) in JUDGE_MODELS else Path(str(model))
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=torch_dtype)
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(folder))
            self.model_id = model_id or (str(model) if str(model) in JUDGE_MODELS else folder.name)
        else:
            from metasae.activations.models import load_model  # lazy: heavy imports

            loaded = load_model(str(model), dtype=dtype)
            self.model, self.tokenizer = loaded.model, tokenizer or loaded.tokenizer
            self.model_id = model_id or str(model)
        if next(self.model.parameters()).dtype != torch_dtype:
            self.model = self.model.to(torch_dtype)
        self.model.eval()
        if int8:  # another arithmetic, another model: its answers are never mixed with the bf16 ones'
            from metasae.autointerp.int8 import quantize_linears

            linears = [n for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)]
            missing = [k for k in int8_keep if not any(n.endswith(k) for n in linears)]
            if missing:
                raise ValueError(f"autointerp.int8_keep: no linear layer of {self.model_id} has a name ending in "
                                 f"{', '.join(map(repr, missing))} (its layers end in e.g. "
                                 f"{', '.join(sorted({n.rpartition('.')[2] for n in linears}))})")
            quantize_linears(self.model, skip=("lm_head", *int8_keep))
            self.model_id = int8_name(self.model_id, tuple(int8_keep))
        self.batch_size = batch_size
        self.share_prefix = share_prefix
        self.last_logits_only = True
        """One-token answers: only each prompt's last position goes through the output layer."""
        self.prefix_caches = PREFIX_CACHES
        """System prompts whose key/value caches are remembered (0: none; each batch encodes its own)."""
        self._prefixes: dict[tuple[int, ...], Any] = {}
        """Key/value caches of the last few system prompts (most recent last): a judge's system
        prompt, common to every batch of its scorer, is encoded once, not once per batch."""
        self.top_logprobs = top_logprobs
        # The judges' answers (1/0, and the 0-9 of the simulator): their first-token
        # log-probabilities are always reported, even outside the top-k, so that P("1") vs
        # P("0") or the expected digit never falls back to the text.
        self._always: dict[int, str] = {}
        for s in always_logprobs:
            ids = self.tokenizer.encode(s, add_special_tokens=False)
            if len(ids) == 1:
                self._always[int(ids[0])] = s
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _prompt(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, messages: Messages, max_new_tokens: int, temperature: float = 0.0,
                 want_logprobs: bool = False) -> Completion:
        out = self.generate_batch([messages], max_new_tokens, temperature, want_logprobs)[0]
        if isinstance(out, LLMFailure):
            raise out
        return out

    def generate_batch(self, batch: Sequence[Messages], max_new_tokens: int, temperature: float = 0.0,
                       want_logprobs: bool = False) -> list[Completion | LLMFailure]:
        out: list[Completion | LLMFailure] = []
        for i in range(0, len(batch), self.batch_size):
            out.extend(self._generate_chunk(batch[i:i + self.batch_size], max_new_tokens, temperature, want_logprobs))
        return out

    def _completion(self, logits_V: Any, text: str | None, want_logprobs: bool) -> Completion:
        """A completion whose first token has ``logits_V`` (text: that token unless given)."""
        import torch

        tok = self.tokenizer
        lp = torch.log_softmax(logits_V.float(), dim=-1)
        if text is None:
            text = tok.decode([int(lp.argmax())], skip_special_tokens=True).strip()
        lps = None
        if want_logprobs:
            top = torch.topk(lp, self.top_logprobs)
            lps = {}
            pairs = list(zip(top.values.tolist(), top.indices.tolist()))
            pairs += [(float(lp[idx]), idx) for idx in self._always]
            for v, idx in pairs:
                s = tok.decode([idx])
                lps[s] = max(lps.get(s, -math.inf), v)
        return Completion(text=text, first_token_logprobs=lps)

    def _first_token_chunk(self, batch: Sequence[Messages]) -> list[Completion] | None:
        """One-token answers with their log-probabilities, the prompts' shared prefix run once.

        The judges' prompts of one latent differ only after the explanation, so the
        system prompt and the explanation (most of each prompt) are encoded once and
        their key/value cache is shared by the batch; each prompt's own tail is
        right-padded (a causal model never looks at the padding after a token).
        Returns None when the prompts share too little for this to pay.
        """
        import torch

        tok = self.tokenizer
        ids = [tok(self._prompt(m), add_special_tokens=False)["input_ids"] for m in batch]
        P = min(len(x) for x in ids) - 1
        for x in ids[1:]:
            n = next((j for j, (a, b) in enumerate(zip(ids[0][:P], x[:P])) if a != b), P)
            P = min(P, n)
        if P < MIN_SHARED_PREFIX or len(batch) < 2:
            return None
        B = len(batch)
        tails = [x[P:] for x in ids]
        L = max(len(t) for t in tails)
        pad = tok.pad_token_id
        suf = torch.tensor([t + [pad] * (L - len(t)) for t in tails])
        mask = torch.tensor([[1] * (P + len(t)) + [0] * (L - len(t)) for t in tails])
        # transformers renamed the forward's ``past_key_values`` to ``cache`` (5.2x)
        params = inspect.signature(self.model.forward).parameters
        kw = "cache" if "cache" in params else "past_key_values"
        last = torch.tensor([len(t) - 1 for t in tails])
        # only each prompt's last position goes through the output layer: over a 150k-token
        # vocabulary the logits of every tail position cost ~15% of the batch
        keep = ({"logits_to_keep": last.unsqueeze(1)} if "logits_to_keep" in params and self.last_logits_only
                else {})
        with torch.no_grad():
            cache = self._prefix_cache(ids[0][:P], self._system_tokens(batch[0], ids[0]), kw,
                                       {"logits_to_keep": 1} if keep else {})
            cache.batch_repeat_interleave(B)
            pos = (P + torch.arange(L)).unsqueeze(0).expand(B, L)
            logits = self.model(input_ids=suf, attention_mask=mask, position_ids=pos, use_cache=True,
                                **{kw: cache}, **keep).logits
        rows = logits[:, 0] if keep else logits[torch.arange(B), last]
        return [self._completion(rows[b], None, True) for b in range(B)]

    def _prefix_cache(self, prefix: list[int], head: int, kw: str, keep: dict[str, Any]) -> Any:
        """The key/value cache of ``prefix``, encoded in two fixed pieces: its first ``head``
        tokens (a judge's system prompt, common to every batch of its scorer: remembered, so
        encoded once) and the rest.  The split depends on the prompt alone, so an answer does
        not depend on which batches came before (a resumed run gets the same numbers)."""
        import copy

        import torch

        cache, n = None, 0
        if self.prefix_caches > 0 and MIN_SHARED_PREFIX <= head < len(prefix):
            key = tuple(prefix[:head])
            hit = self._prefixes.pop(key, None)
            if hit is None:
                out = self.model(input_ids=torch.tensor([list(key)]), use_cache=True, **keep)
                hit = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            self._prefixes[key] = hit  # most recent last; the oldest goes first
            while len(self._prefixes) > self.prefix_caches:
                self._prefixes.pop(next(iter(self._prefixes)))
            cache, n = copy.deepcopy(hit), head
        out = self.model(input_ids=torch.tensor([prefix[n:]]), use_cache=True,
                         **({kw: cache} if cache is not None else {}), **keep)
        return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")

    def _system_tokens(self, messages: Messages, ids: list[int]) -> int:
        """How many leading tokens of the prompt ``ids`` (of ``messages``) hold its system message
        with the template around it; 0 without one."""
        if not messages or messages[0].get("role") != "system":
            return 0
        text = self.tokenizer.apply_chat_template(list(messages[:1]), tokenize=False)
        head = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))

    def _generate_chunk(self, batch: Sequence[Messages], max_new_tokens: int, temperature: float,
                        want_logprobs: bool) -> list[Completion]:
        import torch
        from transformers import GenerationConfig

        if max_new_tokens == 1 and temperature <= 0 and want_logprobs and self.share_prefix:
            done = self._first_token_chunk(batch)
            if done is not None:
                return done
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([self._prompt(m) for m in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = old_side
        sampling = temperature > 0
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
            top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            return_dict_in_generate=True, output_logits=want_logprobs)
        with torch.no_grad():
            res = self.model.generate(**enc, generation_config=gen_cfg)
        new = res.sequences[:, enc["input_ids"].shape[1]:]
        completions = []
        for b in range(len(batch)):
            text = tok.decode(new[b], skip_special_tokens=True).strip()
            if want_logprobs:
                completions.append(self._completion(res.logits[0][b], text, True))
            else:
                completions.append(Completion(text=text))
        return completions


# ---------------------------------------------------------------------------
# OpenAI-compatible HTTP endpoint
# ---------------------------------------------------------------------------


class _Retryable(Exception):
    pass


class OpenAIClient(_BatchByLoop):
    """``POST {base_url}/chat/completions`` with retries and exponential backoff.

    Retried: timeouts, connection errors, HTTP 5xx and 429, malformed JSON or a
    reply without ``choices[0].message.content``.  Other HTTP errors fail at once.
    """

    backend_id = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_retries: int = 3, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, top_logprobs: int = 5,
                 sleep: Callable[[float], None] = time.sleep):
        if not base_url:
            raise ValueError("OpenAIClient needs a base_url, e.g. http://127.0.0.1:8000/v1")
        self.base_url = base_url.rstrip("/")
        self.model_id = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.top_logprobs = top_logprobs
        self._sleep = sleep
        self.n_retries = 0

    def __repr__(self) -> str:
        return f"OpenAIClient(base_url={self.base_url!r}, model={self.model_id!r})"

    def generate(self, messages: Messages, max_new_tokens: int, temperature: float = 0.0,
                 want_logprobs: bool = False) -> Completion:
        body: dict[str, Any] = {"model": self.model_id, "messages": messages,
                                "max_tokens": max_new_tokens, "temperature": temperature}
        if want_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        data = json.dumps(body).encode("utf-8")
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.n_retries += 1
                self._sleep(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))
            try:
                return parse_chat_response(self._post(data))
            except _Retryable as e:
                last = str(e)
        raise LLMFailure(f"{self.base_url}/chat/completions failed after {self.max_retries + 1} attempts: {last}")

    def _post(self, data: bytes) -> Any:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = "Bearer " + key
        req = urllib.request.Request(self.base_url + "/chat/completions", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}") from None
            raise LLMFailure(f"{self.base_url}/chat/completions answered HTTP {e.code}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timed out after {self.timeout_s} s") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"connection error: {type(reason).__name__}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable("malformed JSON in the reply") from None


def parse_chat_response(obj: Any) -> Completion:
    """``choices[0].message.content`` and, if present, the first token's top log-probabilities."""
    try:
        choice = obj["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise _Retryable("reply has no choices[0].message.content") from None
    lps = None
    lp_block = choice.get("logprobs") if isinstance(choice, dict) else None
    if isinstance(lp_block, dict) and lp_block.get("content"):
        first = lp_block["content"][0]
        lps = {}
        for ent in [first, *(first.get("top_logprobs") or [])]:
            try:
                tok, v = ent["token"], float(ent["logprob"])
            except (KeyError, TypeError, ValueError):
                continue
            lps[tok] = max(lps.get(tok, -math.inf), v)
    return Completion(text=text.strip(), first_token_logprobs=lps)


# ---------------------------------------------------------------------------
# Disk cache
# ---------------------------------------------------------------------------


class CachedClient:
    """One JSON file per request under ``cache_dir``; failures are not cached (a rerun retries them)."""

    def __init__(self, inner: Any, cache_dir: str | Path):
        self.inner = inner
        self.cache_dir = Path(cache_dir)
        self.backend_id = inner.backend_id
        self.model_id = inner.model_id
        self.hits = 0
        self.misses = 0

    def key(self, messages: Messages, max_new_tokens: int, temperature: float, want_logprobs: bool) -> str:
        req = {"backend": self.backend_id, "model": self.model_id, "messages": messages,
               "max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
               "want_logprobs": bool(want_logprobs)}
        return hashlib.sha256(json.dumps(req, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _load(self, key: str) -> Completion | None:
        p = self._path(key)
        if not p.is_file():
            return None
        try:
            return Completion.from_dict(json.loads(p.read_text())["completion"])
        except (json.JSONDecodeError, KeyError, TypeError):
            return None

    def _store(self, key: str, messages: Messages, params: dict[str, Any], c: Completion) -> None:
        atomic_write_json(self._path(key), {"backend": self.backend_id, "model": self.model_id,
                                            "messages": messages, "params": params, "completion": c.to_dict()})

    def generate(self, messages: Messages, max_new_tokens: int, temperature: float = 0.0,
                 want_logprobs: bool = False) -> Completion:
        out = self.generate_batch([messages], max_new_tokens, temperature, want_logprobs)[0]
        if isinstance(out, LLMFailure):
            raise out
        return out

    def generate_batch(self, batch: Sequence[Messages], max_new_tokens: int, temperature: float = 0.0,
                       want_logprobs: bool = False) -> list[Completion | LLMFailure]:
        keys = [self.key(m, max_new_tokens, temperature, want_logprobs) for m in batch]
        out: list[Completion | LLMFailure | None] = [self._load(k) for k in keys]
        todo = [i for i, c in enumerate(out) if c is None]
        self.hits += len(batch) - len(todo)
        self.misses += len(todo)
        if todo:
            params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "want_logprobs": want_logprobs}
            fresh = self.inner.generate_batch([batch[i] for i in todo], max_new_tokens, temperature, want_logprobs)
            for i, c in zip(todo, fresh):
                out[i] = c
                if isinstance(c, Completion):
                    self._store(keys[i], batch[i], params, c)
        return out  # type: ignore[return-value]


def role_model(cfg: Any, role: str = "explainer") -> str:
    """The model of ``role`` ("explainer" or "judge") in an :class:`~metasae.config.AutointerpConfig`:
    the judge is ``judge_model`` when set, else the explainer's ``model``."""
    if role not in ("explainer", "judge"):
        raise ValueError(f"role must be 'explainer' or 'judge', not {role!r}")
    return (getattr(cfg, "judge_model", "") or cfg.model) if role == "judge" else cfg.model


def int8_name(model: str, keep: Sequence[str] = ()) -> str:
    """The name of ``model`` with its linear layers in int8 (``autointerp.local_int8``), but those of
    ``keep`` (``autointerp.int8_keep``)."""
    return f"{model}+int8" + (f"-keep-{'-'.join(keep)}" if keep else "")


def model_label(cfg: Any, role: str = "explainer") -> str:
    """:func:`role_model` as the records name it: ``+int8`` when ``local_int8`` runs it in int8."""
    model = role_model(cfg, role)
    if getattr(cfg, "local_int8", False) and cfg.backend == "hf-local":
        return int8_name(model, tuple(getattr(cfg, "int8_keep", ())))
    return model


def make_client(cfg: Any, cache_dir: str | Path | None = None, role: str = "explainer", **kwargs: Any) -> Any:
    """The explainer or judge (``role``) named by an :class:`~metasae.config.AutointerpConfig`, cached if
    ``cache_dir`` (the cache key holds the model: the two roles never share an answer)."""
    model = role_model(cfg, role)
    if cfg.backend == "openai":
        inner: Any = OpenAIClient(cfg.base_url, model, api_key_env=cfg.api_key_env,
                                  timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, **kwargs)
    elif cfg.backend == "hf-local":
        inner = HFLocalClient(model, **{"int8": bool(getattr(cfg, "local_int8", False)),
                                        "int8_keep": tuple(getattr(cfg, "int8_keep", ())), **kwargs})
    else:
        raise ValueError(f"unknown autointerp backend {cfg.backend!r}")
    return CachedClient(inner, cache_dir) if cache_dir is not None else inner
