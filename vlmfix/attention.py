"""The attention function vlmfix registers with transformers' AttentionInterface, and its mask.

Fast path: when no attached method asks for any query row of this layer in this phase, the call
goes straight to the attention function the model used before (`sdpa`, `eager`, flash, ...), with
the mask that function expects: no extra tensor work at all.

A method may also replace the mask of a layer (`mask` hook, pruning); only the methods that
define it are asked, and they answer None (no work) until they prune.

Otherwise the rows the methods asked for are computed in eager form with an fp32 softmax,
handed to the methods (`scores` before the softmax, `probs` after it), multiplied with V and
written into the output; rows nobody asked for still come from the fast path.
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

if TYPE_CHECKING:
    from .attach import Attached

NAME = "vlmfix"

#: id(text config) -> weak reference to the Attached handle that routes it. A routing table, like
#: AttentionInterface's own registry: it holds no per-call state, and entries leave at detach.
_ROUTES: dict[int, "weakref.ref[Attached]"] = {}


def route(config: Any) -> "Attached | None":
    ref = _ROUTES.get(id(config))
    return ref() if ref is not None else None


def previous_attention(implementation: str | None, module: torch.nn.Module) -> Callable:
    """The attention function `implementation` resolves to for `module` ("eager" is the model file's own)."""
    if implementation in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def additive_mask_rows(
    mask: torch.Tensor | None, rows: torch.Tensor, q_start: int, kv_len: int, batch: int
) -> torch.Tensor:
    """fp32 additive mask (B or 1, 1, R, kv_len) for query rows `rows` of the current block.

    Accepts what any transformers mask function produces: None (plain causal), a 4-D bool mask
    (True = attend), a 4-D additive float mask, or a 2-D padding mask (flash attention).
    Masked entries get the fp32 minimum rather than -inf, so a fully masked row cannot give NaN.
    """
    low = torch.finfo(torch.float32).min
    device = rows.device
    if mask is not None and mask.dim() == 4:
        m = mask[:, :, rows, :kv_len]
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, device=device).masked_fill_(~m, low)
        return m.float().clamp(min=low)
    causal = torch.arange(kv_len, device=device)[None, :] <= (rows + q_start)[:, None]  # (R, K)
    allowed = causal[None, None]
    if mask is not None:  # 2-D padding mask (B, K)
        allowed = allowed & mask[:, None, None, :kv_len].bool()
    allowed = allowed.expand(batch if mask is not None else 1, 1, -1, -1)
    return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, low)


def vlmfix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for decoder layers of an attached model. Shapes as transformers' interface:
    query (B, H, Q, D), key/value (B, KV, K, D); returns (B, Q, H, D) and no weights."""
    handle = route(module.config)
    if handle is None:  # a config still naming us after its handle died: behave as sdpa
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    fallback = handle.fallback_attention(module)
    state = handle.state
    if state is None or not handle.methods:
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    q_len, kv_len = query.shape[2], key.shape[2]
    q_start = kv_len - q_len
    for method in handle.maskers:
        replaced = method.mask(state, layer, q_start, q_len, kv_len, attention_mask)
        if replaced is not None:
            attention_mask = replaced
    wanted = []
    for method in handle.methods:
        rows = method.eager_rows(state, layer, q_start, q_len)
        if rows is not None and len(rows):
            wanted.append((method, rows))
    if not wanted:
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    if len(wanted) == 1:
        rows = torch.as_tensor(wanted[0][1], dtype=torch.long, device=query.device)
    else:
        rows = torch.unique(torch.cat([torch.as_tensor(r, dtype=torch.long) for _, r in wanted])).to(query.device)
    out = None
    if len(rows) < q_len:
        out, _ = fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = grouped_scores(query[:, :, rows], key) * scaling
    if attention_mask is not None or q_len > 1:  # a lone decoding row with no mask sees every key
        scores = scores + additive_mask_rows(attention_mask, rows, q_start, kv_len, query.shape[0])
    positions = rows + q_start
    for method, _ in wanted:
        scores = method.scores(state, layer, positions, scores)
    probs = torch.softmax(scores, dim=-1)
    for method, _ in wanted:
        probs = method.probs(state, layer, positions, probs)
    rows_out = grouped_values(probs.to(value.dtype), value).transpose(1, 2)  # (B, R, H, D)
    if out is None:
        return rows_out.contiguous(), None
    out[:, rows] = rows_out.to(out.dtype)
    return out, None


def grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """fp32 q.k^T for query heads (B, H, R, D) against grouped key heads (B, KV, K, D) -> (B, H, R, K).

    Query head h reads key head h // (H / KV), as transformers' repeat_kv; the product runs per
    key head on the native dtype without copying K, then is cast to fp32 (as eager attention does).
    """
    b, h, r, d = query.shape
    kv = key.shape[1]
    grouped = query.reshape(b, kv, (h // kv) * r, d)
    return torch.matmul(grouped, key.transpose(-1, -2)).float().reshape(b, h, r, key.shape[2])


def grouped_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs (B, H, R, K) times grouped value heads (B, KV, K, D) -> (B, H, R, D), without copying V."""
    b, h, r, k = probs.shape
    kv = value.shape[1]
    return torch.matmul(probs.reshape(b, kv, (h // kv) * r, k), value).reshape(b, h, r, value.shape[-1])


def vlmfix_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """Mask for decoder layers of an attached model: the mask the previous implementation expects."""
    handle = route(config)
    implementation = handle.previous_text_implementation if handle is not None else "sdpa"
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        implementation = "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](*args, config=config, **kwargs)
