"""The attention function vlmfix registers with transformers' AttentionInterface, and its masks.

An attached decoder's attention modules each carry a `Route` (attribute `_vlmfix`): the handle,
the layer index and the attention function the model used before (`sdpa`, `eager`, flash, ...).

Fast path: when no attached runtime asks for any query row of this layer call, the call goes
straight to that previous function, with the mask it expects: no extra tensor work at all.

Otherwise (see `vlmfix.core.protocol`) the query rows the calls asked for are computed in eager
form: scores, each `BiasesScores` call's `bias`, the fp32 softmax, each `ObservesQueries` call's
`observe` and each `EditsQueries` call's `edit` (in the runtimes' order), then the product with V
written into the output; queries nobody asked for still come from the fast path. With gradients enabled nothing
autograd needs is written in place: the edits work out of place on the softmax's output (in place
when nothing records gradients), and the fast path's output is copied before the eager rows are
written into it. After in-place pruning a
`SlotView` (slots.py) translates rows and key columns, so runtimes see prompt positions.

Contrast branch rows (`CallState.branch_rows`, batch rows after the B real ones) take the fallback, and so
do the real rows; the eager rows are computed on the rows the calls that asked see (`MethodCall.batch_rows`:
the real rows by default, the branch rows, or all) and written over the fallback's output.

The mask function registered beside each name is the previous implementation's own (sdpa's for
"vlmfix"; "vlmfix_<impl>" for the others), so the fallback always gets the mask it expects.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlmfix.core.protocol import BiasesScores, EditsQueries, ObservesQueries
from vlmfix.core.eager import biased_scores, grouped_scores, grouped_values, mask_scores_, serial_if_small
from vlmfix.core.state import Block, Phase, Queries

NAME = "vlmfix"
#: the attribute of an attached decoder's attention modules that holds their `Route`
ROUTE = "_vlmfix"


class Route:
    """What one attention module of an attached decoder reaches: the handle, its layer, its fallback."""

    __slots__ = ("handle", "layer", "fallback")

    def __init__(self, handle: Any, layer: int, fallback: Callable):
        """`handle`: the `vlmfix.core.attach.Attached` that owns the module (not imported here: attach sits above)."""
        self.handle, self.layer, self.fallback = handle, layer, fallback


def implementation_name(previous: str | None) -> str:
    """The name vlmfix registers for a decoder that used `previous` ("vlmfix" for sdpa), registering it
    (with `previous`'s own mask function) on first use."""
    previous = previous or "eager"
    name = NAME if previous == "sdpa" else f"{NAME}_{previous}"
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        masks = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
        AttentionInterface.register(name, vlmfix_attention)
        AttentionMaskInterface.register(name, masks.get(previous, masks["sdpa"]))
    return name


def previous_attention(implementation: str | None, module: torch.nn.Module) -> Callable:
    """The attention function `implementation` resolves to for `module` ("eager" is the model file's own)."""
    if implementation in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


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
    route = getattr(module, ROUTE, None)
    if route is None:  # a config still naming us on a module that was never attached: behave as sdpa
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    handle = route.handle
    state = handle.state
    if state is None or not handle.active:
        return route.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    phase = state.phase
    # a prefill starts on an empty cache (a static cache's keys are its full length: kv_len - q_len is not the start)
    block = Block(route.layer, phase, None if phase is Phase.DECODE else 0, q_len, kv_len)
    asked: list[range] = []
    for call in state.maskers:
        replaced = call.mask(block, state, attention_mask)
        if replaced is not None:
            attention_mask = replaced
    view = None
    for call in state.movers:
        view = call.view(block, state)
        if view is not None:
            block = block._replace(q_start=view.q_start, q_len=view.q_len, kv_len=view.kv_len)
            break
    wanted = []
    for call in state.askers:
        r = call.queries(block, state)
        if r is not None and len(r):
            wanted.append(call)
            asked.append(r)
    if not wanted:
        return route.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    full = None
    part = slice(None)
    real = len(state.rows)
    if state.branch_rows and query.shape[0] > real:  # contrast branch rows (see vlmfix.core.contrast)
        part = _rows_of(wanted, real, query.shape[0])
        full, _ = route.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if full.requires_grad:
            full = full.clone()
        if part != slice(None):
            query, key, value = query[part], key[part], value[part]
            if attention_mask is not None and attention_mask.shape[0] > 1:
                attention_mask = handle.rows_mask(attention_mask, part.start, part.stop)
    mixed = full is not None and part == slice(None)  # real and branch rows: each call gets those it sees
    rows = union_queries(asked, block)
    whole = rows.count == q_len and view is None
    out = None
    if not whole and full is not None:  # the rows' model output, computed above for every row
        out = full[part]
    elif not whole:
        out, _ = route.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if out.requires_grad:  # the eager rows are written into it, and its backward may read it (SDPA's does)
            out = out.clone()
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    b, h, _, d = query.shape
    with serial_if_small(b * h * rows.count * kv_len * d, query.device):  # multiply-adds of q.k^T (and probs.V)
        if view is not None:
            slots = view.query_slots(rows)  # (B, R) slot of each row's token, and whether it is still present
            scores = view.scores(query, key, attention_mask, slots[0], scaling)
        else:
            q = query if whole else query[:, :, rows.index]
            bias = None
            if whole and phase is Phase.DECODE:  # the step's mask as one additive bias, built once per step
                bias = handle.bias(attention_mask, b, key.shape[1], kv_len, query.dtype, query.device)
            if bias is not None:
                scores = biased_scores(q, key, bias, scaling)
            else:
                scores = grouped_scores(q, key).mul_(scaling)
                if attention_mask is not None or q_len > 1:  # a lone decoding row with no mask sees every key
                    mask_scores_(scores, attention_mask, None if whole else rows.index, block.q_start or 0)
        for call in wanted:
            if isinstance(call, BiasesScores):
                scores = _on_rows(call, mixed, real, scores, lambda t: call.bias(block, state, rows, t))
        probs = torch.softmax(scores, dim=-1)
        for call in wanted:
            if isinstance(call, EditsQueries):
                probs = _on_rows(call, mixed, real, probs, lambda t: call.edit(block, state, rows, t))
            elif isinstance(call, ObservesQueries):
                _on_rows(call, mixed, real, probs, lambda t: call.observe(block, state, rows, t))
        if view is not None:
            rows_out = grouped_values(view.compress(probs).to(value.dtype), value).transpose(1, 2)
            return view.write(out, rows_out, *slots), None
        rows_out = grouped_values(probs.to(value.dtype), value).transpose(1, 2)  # (B, R, H, D)
    if out is None:
        out = rows_out.contiguous()
        if full is not None:
            full[part] = out.to(full.dtype)
    else:
        out[:, rows.index] = rows_out.to(out.dtype)  # with branch rows, `out` is a view of `full`'s rows
    return (out if full is None else full), None


def _rows_of(calls: list, real: int, total: int) -> slice:
    """The batch rows the eager form is computed on, with `real` real rows of `total` (contrast branch rows
    after them): the union of what the calls see (`MethodCall.batch_rows`)."""
    sides = {getattr(c, "batch_rows", "real") for c in calls}
    if sides == {"real"}:
        return slice(0, real)
    if sides == {"branch"}:
        return slice(real, total)
    return slice(None)


def _on_rows(call: Any, mixed: bool, real: int, tensor: torch.Tensor, act: Callable) -> torch.Tensor:
    """`act` (a call's bias / edit / observe) on the rows of `tensor` that `call` sees (`mixed`: `tensor` holds the
    real rows then the branch rows, else only rows the call sees); the new tensor (other rows unchanged)."""
    sees = getattr(call, "batch_rows", "real")
    if not mixed or sees == "all":
        new = act(tensor)
        return tensor if new is None else new
    cut = slice(0, real) if sees == "real" else slice(real, None)
    new = act(tensor[cut])
    if new is None or new.data_ptr() == tensor[cut].data_ptr():  # observed, or edited in place
        return tensor
    return torch.cat([new, tensor[real:]]) if sees == "real" else torch.cat([tensor[:real], new])


def union_queries(ranges: list[range], block: Block) -> Queries:
    """The `Queries` of the union of the calls' query ranges (block indices), with their prompt positions."""
    first = ranges[0]
    if all(r == first for r in ranges[1:]):
        merged: range | list[int] = first
    else:
        every = sorted(set().union(*ranges))
        merged = range(every[0], every[-1] + 1) if every[-1] - every[0] + 1 == len(every) else every
    positions = None
    if isinstance(merged, range):
        index: slice | torch.Tensor = slice(merged.start, merged.stop)
        if block.q_start is not None:
            positions = torch.arange(merged.start + block.q_start, merged.stop + block.q_start)
    else:
        index = torch.tensor(merged)
        if block.q_start is not None:
            positions = index + block.q_start
    return Queries(index, positions, len(merged))
