"""Eager attention rows in fp32: q.k^T against grouped key heads, the masks transformers' mask
functions produce, and the product with V. The arithmetic of vlmfix's eager path (attention.py)
and of the in-place pruning view (slots.py); no state.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


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
    scores: torch.Tensor, mask: torch.Tensor | None, rows: slice | torch.Tensor | None, q_start: int
) -> torch.Tensor:
    """Mask fp32 scores (B, H, R, K) of block rows `rows` (None: the whole block) in place, as
    `scores + additive_mask_rows(...)` would: a 4-D bool mask sets the entries it forbids to the fp32
    minimum directly, a 4-D float mask is added (clamped to the fp32 minimum); other masks go through
    `additive_mask_rows`."""
    kv_len = scores.shape[-1]
    low = torch.finfo(torch.float32).min
    if mask is not None and mask.dim() == 4:
        m = mask[..., :kv_len] if rows is None else mask[:, :, rows, :kv_len]
        if m.dtype == torch.bool:
            return scores.masked_fill_(~m, low)
        return scores.add_(m.float().clamp(min=low))
    if rows is None:
        rows = torch.arange(scores.shape[2], device=scores.device)
    elif isinstance(rows, slice):
        rows = torch.arange(rows.start, rows.stop, device=scores.device)
    return scores.add_(additive_mask_rows(mask, rows.to(scores.device), q_start, kv_len, scores.shape[0]))


#: Eager rows of at most this many multiply-adds run on the calling thread alone (`serial_if_small`).
SERIAL_WORK = 1 << 21


@contextlib.contextmanager
def serial_if_small(work: int, device: torch.device) -> Iterator[None]:
    """Run the block on the calling thread alone when it is `work` <= SERIAL_WORK multiply-adds on a CPU.

    The eager rows of a decoding step are a handful of small products (q.k^T, the methods' sums,
    probs.V) of a few hundred thousand multiply-adds each: a parallel region per product costs
    more in synchronisation than it saves, and on a machine shared with other jobs each region can
    wait a whole scheduler slice for a descheduled worker thread. The thread count is the calling
    thread's own (OpenMP, MKL) and is restored on exit. Nothing changes on other devices or while
    compiling.
    """
    if device.type != "cpu" or work > SERIAL_WORK or torch.compiler.is_compiling():
        yield
        return
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def grouped_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """fp32 q.k^T for query heads (B, H, R, D) against grouped key heads (B, KV, K, D) -> (B, H, R, K).

    Query head h reads key head h // (H / KV), as transformers' repeat_kv; the product runs per
    key head on the native dtype without copying K, then is cast to fp32 (as eager attention does).
    """
    grouped, keys = _grouped(query, key)
    return torch.bmm(grouped, keys).float().view(*query.shape[:3], key.shape[2])


def _grouped(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Query heads (B, H, R, D) as (B * KV, H / KV * R, D) beside their key head's K^T (B * KV, D, K): views."""
    b, h, r, d = query.shape
    kv, k = key.shape[1], key.shape[2]
    return query.reshape(b * kv, (h // kv) * r, d), key.reshape(b * kv, k, d).transpose(1, 2)


def additive_bias(mask: torch.Tensor | None, batch: int, kv_heads: int, kv_len: int,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The model's mask of a decoding block as an additive bias (B * KV or 1, Q or 1, kv_len) in `dtype`
    for `biased_scores` (0 = attend, the dtype's minimum = masked); None for a 2-D padding mask.

    A decoding block's rows may see every key the mask allows (the causal part is in the mask, or
    there is none: a lone row sees every key), so no causal term is added here.
    """
    if mask is None:
        return torch.zeros(1, 1, kv_len, dtype=dtype, device=device)
    if mask.dim() != 4:
        return None
    m = mask[..., :kv_len]
    low = torch.finfo(dtype).min
    bias = torch.where(m, 0.0, low).to(dtype) if m.dtype == torch.bool else m.to(dtype).clamp(min=low)
    if bias.shape[0] == 1:
        return bias[0]
    return bias.expand(-1, kv_heads, -1, -1).reshape(batch * kv_heads, bias.shape[2], kv_len)


def biased_scores(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 masked, scaled scores (B, H, R, K) in one product: bias + scaling * q.k^T on grouped key heads
    (bias from `additive_bias`, in the query's dtype; cast to fp32 after, as eager attention does)."""
    grouped, keys = _grouped(query, key)
    return torch.baddbmm(bias, grouped, keys, alpha=scaling).float().view(*query.shape[:3], key.shape[2])


#: On a CPU, a product with fewer output columns than this runs transposed (`grouped_values`)
NARROW = 16


def grouped_values(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs (B, H, R, K) times grouped value heads (B, KV, K, D) -> (B, H, R, D), without copying V.

    With narrow heads (D < NARROW) on a CPU and several rows, the product runs as (V^T probs^T)^T: CPU
    BLAS kernels are several times slower on a (R, K) x (K, D) product with a handful of output
    columns than on its transpose (measured 1.2 ms against 0.3 ms for 32 x 40 rows, 616 keys, D = 8).
    """
    b, h, r, k = probs.shape
    kv, d = value.shape[1], value.shape[-1]
    p = probs.reshape(b * kv, (h // kv) * r, k)
    v = value.reshape(b * kv, k, d)
    if d < NARROW and r > 1 and probs.device.type == "cpu":
        return torch.bmm(v.transpose(1, 2), p.transpose(1, 2)).transpose(1, 2).reshape(b, h, r, d)
    return torch.bmm(p, v).view(b, h, r, d)
