"""DivPrune: max-min diversity selection of the visual tokens before the decoder.

Paper: Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025 (arXiv 2503.02175). Training-free, text-free: the kept tokens are the subset S of the
visual tokens V (|S| = M~) that maximises the minimum pairwise distance, the Max-Min Diversity Problem

    S* = argmax_{S in V, |S| = M~}  min_{i != j in S} d(v_i, v_j),   d(a, b) = 1 - a.b / (|a| |b|)

(cosine distance of the image features), solved as the paper does, greedily:

    s_1 = argmax_i min_{j != i} d(v_i, v_j)                  (the token farthest from its nearest neighbour)
    s_t = argmax_{i not in S} min_{s in S} d(v_i, v_s),   t = 2 .. M~

(ties go to the lower index). The running minimum m_i = min_{s in S} d(v_i, v_s) is updated with one row
of the distance matrix per step: M~ vector steps over the N tokens (no loop over tokens), one N x N
matrix product for the distances.

Where: the paper prunes the visual tokens the LLM receives (after the projector). Those are the decoder's
layer-0 inputs at the visual positions in every supported family, so the selection reads them there
(`MovesTokens.before_layer` at layer 0) and the unselected tokens leave the sequence before layer 0
(`vlmfix.methods.predecoder`; or, `form="mask"`, are masked out as keys from layer 0 on: the form that runs
under a static cache / compiled generation); no family's vision tower is read. On Qwen3-VL only the mask form
runs (its deepstack adds visual features to the first layers at every image position, which in-place pruning
from layer 0 would lose).

Choices where the paper leaves them open (also in docs/methods.md, "DivPrune"):
- the unit: a batch row's visual tokens together (every image, tile, newline token and video frame of the
  row; the budget `keep` / `keep_ratio` counts the row's), as the paper prunes the whole visual input of
  the LLM: near-duplicate tiles or frames compete with each other;
- kept tokens keep their original positions (the paper drops the others from the sequence, so the LLM
  renumbers them): vlmfix's in-place pruning never renumbers, as its FastV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmfix.methods.base import CallState, MethodConfig, raise_problems
from vlmfix.methods.predecoder import PreDecoderCall, PreDecoderRuntime, budget_problems
from vlmfix.methods.registry import register_method

__all__ = ["DivPrune", "DivPruneCall", "DivPruneRuntime", "max_min_select"]


def max_min_select(features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy max-min diversity selection of `k` of the (N, D) `features` under cosine distance: (the
    selected indices in selection order (k,), the minimum distance each had to the tokens selected before it
    (k,), the first one's to its nearest neighbour)."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    n, device = x.shape[0], x.device
    if n == 1:
        return torch.zeros(1, dtype=torch.long), torch.zeros(1)
    dist = 1.0 - x @ x.T
    far = (dist + torch.diag(dist.new_full((n,), float("inf")))).min(1).values
    picked = torch.empty(k, dtype=torch.long, device=device)
    gaps = torch.empty(k, device=device)
    i = torch.argmax(far).view(1)  # indices stay tensors: no host read per step (a GPU never waits)
    picked[0], gaps[0] = i[0], far.gather(0, i)[0]
    running = dist.index_select(0, i)[0]
    for t in range(1, k):  # k vector steps over the N tokens
        running.scatter_(0, i, -1.0)  # a selected token is never selected again (distances are >= 0, up to rounding)
        i = torch.argmax(running).view(1)
        picked[t], gaps[t] = i[0], running.gather(0, i)[0]
        running = torch.minimum(running, dist.index_select(0, i)[0])
    return picked.cpu(), gaps.cpu()


class DivPruneCall(PreDecoderCall):
    """Selects each row's kept visual tokens from the hidden states entering decoder layer 0 (the prefill),
    then `InPlaceMoves` gathers them."""

    def __init__(self, runtime: "DivPruneRuntime", state: CallState):
        super().__init__(runtime, state)
        self._chosen = False

    def before_layer(self, layer: int, state: CallState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if layer == 0 and not self._chosen:
            self._chosen = True
            hidden = args[0] if args else kwargs["hidden_states"]
            self._choose(state, hidden.detach())
        return super().before_layer(layer, state, args, kwargs)

    def _choose(self, state: CallState, hidden: torch.Tensor) -> None:
        kept, budgets, scores = [], [], []
        for row in state.rows:
            img = row.image_positions
            n = len(img)
            if not n:
                kept.append(img)
                budgets.append(0)
                scores.append(torch.zeros(0))
                continue
            self._note_keep(row.index, n, "its image(s)")
            k = self.runtime.budget(n)
            picked, gaps = max_min_select(hidden[row.index, img.to(hidden.device)], k)
            score = torch.zeros(n)
            score[picked] = gaps.clamp_min(0)  # each kept token's distance to those kept before it
            kept.append(img[picked].sort().values)
            budgets.append(k)
            scores.append(score)
        self._stage(state, kept, budgets, scores)


class DivPruneRuntime(PreDecoderRuntime):
    """DivPrune bound to a model (every family whose decoder takes 4-D masks; Qwen3-VL in the mask form)."""

    read_layers = (0,)  # the mask form reads layer 0's inputs too

    def start(self, state: CallState) -> DivPruneCall:
        return DivPruneCall(self, state)

    call = DivPruneCall


@dataclass
class DivPrune(MethodConfig):
    """DivPrune (Alvar et al., CVPR 2025): keep the max-min diverse subset of each row's visual tokens (cosine
    distance of the image features), before the decoder.

    - keep: visual tokens kept per batch row (128 when neither keep nor keep_ratio is given: the budget the
      pruning papers compare at, of LLaVA-1.5's 576); or keep_ratio in (0, 1] of each row's visual tokens;
    - form: "inplace" (the pruned tokens leave the sequence: the speed-up) or "mask" (they are masked out as keys
      from layer 0 on: the form that runs under a static cache / compiled generation; same tokens, same logits).
    Every mistake is refused at construction."""

    keep: int | None = None
    keep_ratio: float | None = None
    form: str = "inplace"

    def __post_init__(self) -> None:
        raise_problems("DivPrune", budget_problems(self.keep, self.keep_ratio, self.form))


register_method(name="divprune", config=DivPrune, runtime=DivPruneRuntime,
                summary="DivPrune (Alvar et al., CVPR 2025): keep the max-min diverse visual tokens (cosine distance "
                        "of the image features), before the decoder")
