"""The attention function vlmfix registers with transformers' AttentionInterface, and its mask.

Fast path: when no attached method asks for any query row of this layer in this phase, the call
goes straight to the attention function the model used before (`sdpa`, `eager`, flash, ...), with
the mask that function expects: no extra tensor work at all.

A method may also replace the mask of a layer (`mask` hook, pruning); only the methods that
define it are asked, and they answer None (no work) until they prune.

Otherwise the rows the methods asked for are computed in eager form with an fp32 softmax,
handed to the methods (`scores` before the softmax, `probs` after it), multiplied with V and
written into the output; rows nobody asked for still come from the fast path. After in-place
pruning a `SlotView` (slots.py) translates rows and key columns, so methods see prompt positions.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

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


def mask_scores_(
    scores: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None, q_start: int
) -> torch.Tensor:
    """Mask fp32 scores (B, H, R, K) of block rows `rows` (None: the whole block) in place, as
    `scores + additive_mask_rows(...)` would: a 4-D bool mask sets the entries it forbids to the fp32
    minimum directly (no additive mask built); other masks go through `additive_mask_rows`."""
    kv_len = scores.shape[-1]
    if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
        allowed = mask[..., :kv_len] if rows is None else mask[:, :, rows, :kv_len]
        return scores.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    if rows is None:
        rows = torch.arange(scores.shape[2], device=scores.device)
    return scores.add_(additive_mask_rows(mask, rows, q_start, kv_len, scores.shape[0]))


#: Eager rows of at most this many multiply-adds run on the calling thread alone (`serial_if_small`).
SERIAL_WORK = 1 << 21


@contextlib.contextmanager
def serial_if_small(work: int) -> Iterator[None]:
    """Run the block on the calling thread alone when it is `work` <= SERIAL_WORK multiply-adds.

    The eager rows of a decoding step are a handful of small products (q.k^T, the methods' sums,
    probs.V) of a few hundred thousand multiply-adds each: a parallel region per product costs
    more in synchronisation than it saves, and on a machine shared with other jobs each region can
    wait a whole scheduler slice for a descheduled worker thread. The thread count is the calling
    thread's own (OpenMP, MKL) and is restored on exit.
    """
    threads = torch.get_num_threads()
    if threads == 1 or work > SERIAL_WORK:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        replaced = method.mask(state, layer, q_start, q_len, kv_len, attention_mask, query.device)
        if replaced is not None:
            attention_mask = replaced
    view = handle.slot_view(state, layer, q_len, kv_len)  # in-place pruning moved the tokens: vlmfix/slots.py
    start, length = (q_start, q_len) if view is None else (view.q_start, view.q_len)  # in prompt positions
    wanted = []
    for method in handle.methods:
        rows = method.eager_rows(state, layer, start, length)
        if rows is not None and len(rows):
            wanted.append((method, rows))
    if not wanted:
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    if len(wanted) == 1:
        rows = torch.as_tensor(wanted[0][1], dtype=torch.long, device=query.device)
    else:
        rows = torch.unique(torch.cat([torch.as_tensor(r, dtype=torch.long) for _, r in wanted])).to(query.device)
    out = None
    if len(rows) < q_len or view is not None:
        out, _ = fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    b, h, _, d = query.shape
    with serial_if_small(b * h * len(rows) * kv_len * d):  # multiply-adds of q.k^T (and of probs.V)
        if view is not None:
            slots = view.query_slots(rows)  # (B, R) slot of each row's token, and whether it is still present
            scores = view.scores(query, key, attention_mask, slots[0], scaling)
        else:
            whole = len(rows) == q_len  # rows are distinct block indices: the whole block (a decoding step)
            scores = grouped_scores(query if whole else query[:, :, rows], key).mul_(scaling)
            if attention_mask is not None or q_len > 1:  # a lone decoding row with no mask sees every key
                mask_scores_(scores, attention_mask, None if whole else rows, q_start)
        positions = rows + start
        for method, _ in wanted:
            scores = method.scores(state, layer, positions, scores)
        probs = torch.softmax(scores, dim=-1)
        for method, _ in wanted:
            probs = method.probs(state, layer, positions, probs)
        if view is not None:
            rows_out = grouped_values(view.compress(probs).to(value.dtype), value).transpose(1, 2)
            return view.write(out, rows_out, *slots), None
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
    kv, k = key.shape[1], key.shape[2]
    grouped = query.reshape(b * kv, (h // kv) * r, d)
    return torch.bmm(grouped, key.reshape(b * kv, k, d).transpose(1, 2)).float().view(b, h, r, k)


def grouped_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs (B, H, R, K) times grouped value heads (B, KV, K, D) -> (B, H, R, D), without copying V."""
    b, h, r, k = probs.shape
    kv, d = value.shape[1], value.shape[-1]
    return torch.bmm(probs.reshape(b * kv, (h // kv) * r, k), value.reshape(b * kv, k, d)).view(b, h, r, d)


def vlmfix_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """Mask for decoder layers of an attached model: the mask the previous implementation expects."""
    handle = route(config)
    implementation = handle.previous_text_implementation if handle is not None else "sdpa"
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        implementation = "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[implementation](*args, config=config, **kwargs)
