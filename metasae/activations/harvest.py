"""Reading and patching the residual stream through nnsight (the only nnsight user).

The site is ``resid_pre`` of block L: the *input* of decoder block L, which is
HF ``hidden_states[L]`` (SPEC section 2).  We read it as the block's first
input, so the accessor does not depend on what the block returns: in
transformers 5 a decoder block returns a tensor, not a tuple, and the old idiom
``block.output[0]`` silently returns batch row 0.  After the read,
``tracer.stop()`` skips the rest of the model (the 49-50k-vocabulary heads
dominate the cost on CPU).

The CE splice (SPEC section 3.4) replaces the same input by an SAE's
reconstruction, by zeros, or leaves it alone, and compares next-token losses.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from metasae.activations.models import LoadedModel, resolve_path, torch_dtype


def check_site(loaded: LoadedModel, layer: int, ctx_len: int | None = None) -> None:
    """Raise a one-sentence ValueError for a layer or context the model cannot serve."""
    n = loaded.spec.n_layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} is out of range for {loaded.spec.name}, whose blocks are 0..{n - 1}")
    if ctx_len is not None and ctx_len > loaded.spec.max_ctx:
        raise ValueError(
            f"ctx_len {ctx_len} is longer than {loaded.spec.name}'s context limit of {loaded.spec.max_ctx} tokens")


def _nn(loaded: LoadedModel) -> Any:
    """The NNsight wrapper, built once per loaded model (tensor inputs need no tokenizer)."""
    wrapped = getattr(loaded, "_nnsight", None)
    if wrapped is None:
        from nnsight import NNsight

        wrapped = NNsight(loaded.model)
        object.__setattr__(loaded, "_nnsight", wrapped)
    return wrapped


def _block_envoy(loaded: LoadedModel, layer: int) -> Any:
    return resolve_path(_nn(loaded), loaded.spec.blocks_path)[layer]


def _position_ids(mask_RT: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding gets 0)."""
    pos = mask_RT.long().cumsum(-1) - 1
    return pos.clamp_min(0)


def _model_device(loaded: LoadedModel) -> torch.device:
    return next(loaded.model.parameters()).device


def _forward_kwargs(tokens_RT: torch.Tensor, attention_mask_RT: torch.Tensor | None,
                    device: torch.device | None = None) -> dict[str, Any]:
    """Model inputs, on the model's device (the model may sit on a GPU; tokens live on the CPU)."""
    kw: dict[str, Any] = {"input_ids": tokens_RT.to(device)}
    if attention_mask_RT is not None:
        kw["attention_mask"] = attention_mask_RT.long().to(device)
        kw["position_ids"] = _position_ids(attention_mask_RT).to(device)
    kw["use_cache"] = False
    return kw


@torch.inference_mode()
def read_resid_pre(loaded: LoadedModel, layer: int, tokens_RT: torch.Tensor,
                   attention_mask_RT: torch.Tensor | None = None) -> torch.Tensor:
    """resid_pre of block ``layer`` for one batch (R x T x D, the model's dtype)."""
    check_site(loaded, layer, tokens_RT.shape[-1])
    nn = _nn(loaded)
    block = _block_envoy(loaded, layer)
    with nn.trace(**_forward_kwargs(tokens_RT, attention_mask_RT, _model_device(loaded))) as tracer:
        acts = block.input.save()
        tracer.stop()
    acts = acts.value if hasattr(acts, "value") else acts
    if isinstance(acts, torch.Tensor):
        acts = acts.cpu()
    if not isinstance(acts, torch.Tensor) or acts.shape[:2] != tokens_RT.shape:
        raise RuntimeError(f"resid_pre of block {layer} has shape {getattr(acts, 'shape', None)}, "
                           f"expected {tuple(tokens_RT.shape)} x d")
    return acts


def harvest_rows(loaded: LoadedModel, layer: int, tokens_RT: torch.Tensor,
                 attention_mask_RT: torch.Tensor | None = None, batch_rows: int = 16,
                 dtype: torch.dtype | str | None = None) -> Iterator[torch.Tensor]:
    """Yield resid_pre of block ``layer`` for successive batches of rows (rows x T x D).

    ``attention_mask_RT`` supports left padding (positions restart at each
    row's first real token).  ``dtype`` casts the yielded activations.
    """
    check_site(loaded, layer, tokens_RT.shape[-1])
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be a positive integer, not {batch_rows!r}")
    out_dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    for i in range(0, tokens_RT.shape[0], batch_rows):
        m = None if attention_mask_RT is None else attention_mask_RT[i:i + batch_rows]
        acts = read_resid_pre(loaded, layer, tokens_RT[i:i + batch_rows], m)
        yield acts if out_dtype is None else acts.to(out_dtype)


# ---------------------------------------------------------------------------
# CE splice
# ---------------------------------------------------------------------------


@torch.inference_mode()
def _patched_logits(loaded: LoadedModel, layer: int, tokens_RT: torch.Tensor, attn_RT: torch.Tensor,
                    valid_RT: torch.Tensor, patch: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    nn = _nn(loaded)
    block = _block_envoy(loaded, layer)
    with nn.trace(**_forward_kwargs(tokens_RT, attn_RT, _model_device(loaded))):
        if patch is not None:
            x_RTD = block.input
            new_RTD = x_RTD.clone()
            sel = valid_RT.to(x_RTD.device)
            x_ND = x_RTD[sel]
            new_RTD[sel] = patch(x_ND).to(x_RTD.dtype)
            block.input = new_RTD
        logits = nn.output.save()
    logits = logits.value if hasattr(logits, "value") else logits
    return (logits.logits if hasattr(logits, "logits") else logits[0]).float().cpu()


def ce_with_splice(loaded: LoadedModel, layer: int, tokens_RT: torch.Tensor, mask_RT: torch.Tensor,
                   splice_fn: Callable[[torch.Tensor], torch.Tensor], batch_rows: int = 16,
                   attention_mask_RT: torch.Tensor | None = None) -> dict[str, float]:
    """Next-token CE with resid_pre of block ``layer`` spliced, zero-ablated and clean.

    ``mask_RT`` marks valid positions (False on BOS and padding): only they are
    replaced (by ``splice_fn(x_ND)``, e.g. an SAE's reconstruction, or by zeros),
    and a prediction counts when the *predicted* position is valid.  Padding is
    inferred as "not valid and not BOS" unless ``attention_mask_RT`` is given.
    KL(clean || patched) is averaged over the same predictions.
    """
    return ce_with_splices(loaded, layer, tokens_RT, mask_RT, {"spliced": splice_fn}, batch_rows,
                           attention_mask_RT)["spliced"]


def ce_with_splices(loaded: LoadedModel, layer: int, tokens_RT: torch.Tensor, mask_RT: torch.Tensor,
                    splice_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], batch_rows: int = 16,
                    attention_mask_RT: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
    """:func:`ce_with_splice` for several splices at once: the clean and zero-ablated
    forwards run once per batch, shared by every splice (one forward each)."""
    check_site(loaded, layer, tokens_RT.shape[-1])
    mask_RT = mask_RT.bool()
    if attention_mask_RT is None:
        attention_mask_RT = mask_RT | (tokens_RT == loaded.bos_token_id)
    names = list(splice_fns)
    sums = {nm: {k: 0.0 for k in ("spliced_ce", "kl_spliced")} for nm in names}
    shared = {"clean_ce": 0.0, "zero_ce": 0.0, "kl_zero": 0.0}
    n_tok = 0
    for i in range(0, tokens_RT.shape[0], batch_rows):
        tok = tokens_RT[i:i + batch_rows]
        valid = mask_RT[i:i + batch_rows]
        attn = attention_mask_RT[i:i + batch_rows]
        target = tok[:, 1:]
        pred_mask = valid[:, 1:]
        n = int(pred_mask.sum())
        if n == 0:
            continue
        tgt = target[pred_mask]

        def logprobs(patch):
            logits = _patched_logits(loaded, layer, tok, attn, valid, patch)[:, :-1]
            return F.log_softmax(logits[pred_mask], dim=-1)

        lp_clean = logprobs(None)
        p_clean = lp_clean.exp()
        shared["clean_ce"] += float(-lp_clean.gather(1, tgt[:, None]).sum())
        lp = logprobs(torch.zeros_like)
        shared["zero_ce"] += float(-lp.gather(1, tgt[:, None]).sum())
        shared["kl_zero"] += float((p_clean * (lp_clean - lp)).sum())
        for nm in names:
            lp = logprobs(splice_fns[nm])
            sums[nm]["spliced_ce"] += float(-lp.gather(1, tgt[:, None]).sum())
            sums[nm]["kl_spliced"] += float((p_clean * (lp_clean - lp)).sum())
        n_tok += n
    if n_tok == 0:
        raise ValueError("no valid next-token predictions: the mask excludes every position")
    base = {k: v / n_tok for k, v in shared.items()}
    return {nm: {**base, **{k: v / n_tok for k, v in sums[nm].items()}, "n_tokens": n_tok} for nm in names}
