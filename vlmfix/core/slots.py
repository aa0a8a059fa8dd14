"""Attention rows in prompt positions after in-place token pruning.

In-place pruning (methods/prune.py) removes tokens from the hidden states and the KV cache of the
layers from a stage on: the query and key slots of such a layer are a per-batch-row subset of the
prompt positions (`SlotMap.pos`), followed by the generated tokens. Methods never see slots: they
name query rows by prompt position and read and edit rows whose key columns are the prompt
positions followed by the generated tokens, exactly as in the mask form. A `SlotView` translates
one layer call:

- query rows: prompt position p of batch row b -> the slot holding p; when that token is gone, the
  last slot before it (such rows are computed for the methods to see but never written back);
- key columns: the fp32 scores over the key slots are scattered to the prompt positions, absent
  ones getting the fp32 minimum (probability exactly 0, as a masked key's in the mask form), and
  the probabilities are gathered back to the slots after the methods edited them.
"""

from __future__ import annotations

from functools import cached_property

import torch

from vlmfix.core.eager import additive_mask_rows, grouped_scores
from vlmfix.core.state import Phase, Queries, SlotMap


class SlotView:
    """The translation for one call of one in-place-pruned layer (see the module docstring).

    `q_start` / `q_len` give the current block in original positions: the whole prompt at the
    prefill, the last `q_len` positions of prompt + generated tokens at a decoding step.
    """

    def __init__(self, smap: SlotMap, prompt_len: int, phase: Phase, q_len: int, kv_len: int):
        self.smap = smap
        self.prompt_len = prompt_len
        self.prefill = phase is Phase.PREFILL
        self.extra = kv_len - smap.pos.shape[1]  # generated tokens in the cache
        self.kv_len = prompt_len + self.extra  # key columns in original positions
        self.q_start, self.q_len = (0, prompt_len) if self.prefill else (self.kv_len - q_len, q_len)

    @property
    def owner(self) -> torch.Tensor | None:
        """(B, prompt_len): the kept position each position removed at this stage was merged into, -1 for
        none; None without merging (`SlotMap.owner`)."""
        return self.smap.owner

    @cached_property
    def key_pos(self) -> torch.Tensor:
        """(B, K_slots) original position of each key slot."""
        b = self.smap.pos.shape[0]
        tail = torch.arange(self.prompt_len, self.kv_len).expand(b, self.extra)
        return torch.cat([self.smap.pos, tail], 1)

    def query_slots(self, rows: Queries) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slot (B, R), present (B, R)) for the block rows `rows`; at a decoding step (the same rows in
        both coordinates) present is None: every row is there."""
        b = self.smap.pos.shape[0]
        if not self.prefill:
            index = torch.arange(self.q_len)[rows.index] if isinstance(rows.index, slice) else rows.index
            return index.expand(b, -1), None
        wanted = rows.positions.expand(b, -1).contiguous()
        pos = self.smap.pos.contiguous()
        slot = (torch.searchsorted(pos, wanted, right=True) - 1).clamp_min(0)
        present = (pos.gather(1, slot) == wanted) & self.smap.valid.gather(1, slot)
        return slot, present

    def scores(self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               slot: torch.Tensor, scaling: float) -> torch.Tensor:
        """fp32 masked scores (B, H, R, kv_len in original positions) of the query slots `slot` (B, R)."""
        b, h, _, d = query.shape
        idx = slot.to(query.device)
        q = query.gather(2, idx[:, None, :, None].expand(b, h, -1, d))
        s = grouped_scores(q, key) * scaling
        if attention_mask is not None:  # the pruner's mask over the slots, (B or 1, 1, Q, K)
            m = attention_mask.expand(b, -1, -1, -1)
            m = m.gather(2, idx.to(m.device)[:, None, :, None].expand(b, 1, -1, m.shape[-1]))
            s = s + additive_mask_rows(m, torch.arange(m.shape[2], device=s.device), 0, key.shape[2], b)
        full = s.new_full((*s.shape[:3], self.kv_len), torch.finfo(torch.float32).min)
        return full.scatter_(3, self._key_index(s), s)

    def compress(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, H, R, kv_len in original positions) -> (B, H, R, K_slots)."""
        return probs.gather(3, self._key_index(probs))

    def _key_index(self, like: torch.Tensor) -> torch.Tensor:
        b, h, r = like.shape[:3]
        return self.key_pos.to(like.device)[:, None, None, :].expand(b, h, r, -1)

    @staticmethod
    def write(out: torch.Tensor, rows_out: torch.Tensor, slot: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """Write the rows (B, R, H, D) of present tokens into the attention output (B, Q, H, D) at their slots
        (present None: every row, a decoding step)."""
        if present is None:
            out[:, slot[0].to(out.device)] = rows_out.to(out.dtype)
            return out
        b_idx, r_idx = present.nonzero(as_tuple=True)
        at = slot[b_idx, r_idx].to(out.device)
        b_idx, r_idx = b_idx.to(out.device), r_idx.to(out.device)
        out[b_idx, at] = rows_out[b_idx, r_idx].to(out.dtype)
        return out
