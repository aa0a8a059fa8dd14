"""The vision side: `ReadsVision` and `EditsFeatures` calls (see `vlmfix.core.protocol`), before the decoder.

What a call receives, per image (`VisionImage`), once per prefill: the vision tower's queries and keys at
the encoder layer its runtime names (`vision_layer`), captured by forward hooks on that layer's attention
`q_proj` / `k_proj` (the tower keeps its own attention implementation, SDPA or other: nothing is patched,
and the attention is recomputed from q and k, softmax(q k^T * scale) in fp32, only when read), that
layer's output hidden states (a forward hook on the layer), the image's projected features (a forward
hook on the multi-modal projector) and the map from tower tokens to its image tokens (the adapter's
`vision_token_map`: LLaVA-1.5 the identity over the patch grid, its CLS token feeding nothing with the
"default" feature strategy; Gemma 3 k x k patches pooled into one token).

Timing: the tower's hooks are added when the tower starts (a pre-hook, the one permanent hook, present
only while some attached runtime's call class has one of the two capabilities) and removed once the
projector ran. In a plain forward the tower runs inside the prefill: the calls read and edit there, and
the projector's output is replaced. `generate` encodes the images before the prefill's forward (before
any call exists): the capture waits for the prefill, where the calls read it and the edited features are
written into the projector's output in place (the tensor the prefill scatters). A second tower run in
the same call (a GIFT pre-pass) gets the first run's edited features. Families whose adapter does not map
the tower (`Adapter.vision_side`) are refused at attach.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch
from torch import nn

from vlmfix.core.errors import VlmfixError
from vlmfix.core.protocol import EditsFeatures, ReadsVision, Runtime
from vlmfix.core.state import CallState, Phase

__all__ = ["VisionHooks", "VisionImage", "vision_runtimes"]


def vision_runtimes(runtimes: Sequence[Runtime]) -> tuple[Runtime, ...]:
    """The runtimes whose call class reads the vision tower or edits the image features."""
    return tuple(r for r in runtimes if issubclass(r.call, (ReadsVision, EditsFeatures)))


@dataclass
class VisionImage:
    """One image of the batch (in `pixel_values` order) as the vision tower saw it.

    - `index`: the image's index in the batch's images; `row`, `image_index`: its batch row and its place
      among that row's images; `positions` (N,): the prompt positions of its N image tokens;
    - `features` (N, D): its projected features as the projector gave them;
    - `token_map` (T,): the offset among the N tokens that each of the tower's T tokens feeds, -1 for
      none (a dropped CLS token); several tower tokens may feed one token (Gemma 3's pooling);
    - `layer`: the tower's encoder layer read (None for an `EditsFeatures`-only call: no tower tensors);
      `queries` / `keys` (H, T, d) fp32 there; `hidden` (T, D_v): that layer's output hidden states;
      `attention` (H, T, T) fp32 and `mean_attention` (T, T) computed from them;
    - `projector_input` (N, D_in): what the projector turned into `features`, where it maps one input row to
      one image token (LLaVA-1.5's MLP); None where it does not (Gemma 3 pools k x k patches into a token).
    """

    index: int
    row: int
    image_index: int
    positions: torch.Tensor
    features: torch.Tensor
    token_map: torch.Tensor
    layer: int | None = None
    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    scale: float = 1.0
    projector_input: torch.Tensor | None = None

    @cached_property
    def attention(self) -> torch.Tensor:
        """(H, T, T) fp32: each head's softmax(q k^T * scale) (the tower attends without a mask)."""
        if self.queries is None:
            raise RuntimeError("no tower layer was read for this call (its call class is not ReadsVision)")
        return torch.softmax(self.queries @ self.keys.transpose(-1, -2) * self.scale, dim=-1)

    @property
    def mean_attention(self) -> torch.Tensor:
        """(T, T) fp32: the attention averaged over heads."""
        return self.attention.mean(0)

    def pooled(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tower-token `values` (T, ...) -> per image token (N, ...): the mean over the tower tokens feeding
        each token (tokens fed by none get 0)."""
        keep = self.token_map >= 0
        idx = self.token_map[keep].to(values.device)
        out = values.new_zeros((len(self.positions), *values.shape[1:]))
        count = values.new_zeros(len(self.positions))
        out.index_add_(0, idx, values[keep.to(values.device)])
        count.index_add_(0, idx, torch.ones_like(idx, dtype=values.dtype))
        return out / count.clamp_min(1).view(-1, *[1] * (values.dim() - 1))


class VisionHooks:
    """The vision-side hooks of one attached handle (see the module docstring)."""

    def __init__(self, handle: Any, runtimes: Sequence[Runtime]):
        adapter = handle.adapter
        adapter.check_vision_side()
        self.handle, self.adapter = handle, adapter
        self.tower, self.layers, self.projector = adapter.vision_tower, adapter.vision_layers, adapter.projector
        n = len(self.layers)
        #: the tower layer each reading runtime reads
        self.layer_of: dict[int, int] = {}
        for r in runtimes:
            if not issubclass(r.call, ReadsVision):
                continue
            k = r.vision_layer
            k = adapter.vision_feature_layer if k is None else k
            if not isinstance(k, int) or not -n <= k < n:
                raise ValueError(f"{type(r.config).__name__}: vision_layer {k!r} is out of range: the vision tower "
                                 f"has {n} encoder layers (give 0 .. {n - 1}, or negative from the last)")
            self.layer_of[id(r)] = k % n
        self._temp: list[torch.utils.hooks.RemovableHandle] = []
        self._local = threading.local()  # `capture` (being filled), `pending` (waiting for the prefill)
        self._done: tuple[CallState, torch.Tensor] | None = None

    def hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        """The permanent hook: the tower's pre-hook that adds the capturing hooks at each tower run."""
        return [self.tower.register_forward_pre_hook(self._arm)]

    def drop(self) -> None:
        for h in self._temp:
            h.remove()
        self._temp.clear()

    # -- capture -----------------------------------------------------------------------------------
    def _arm(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        self.drop()
        cap: dict[str, dict[int, torch.Tensor]] = {"q": {}, "k": {}, "h": {}}
        self._local.capture = cap

        def keep(kind: str, layer: int):
            def hook(mod: nn.Module, a: tuple, out: Any) -> None:
                cap[kind][layer] = (out[0] if isinstance(out, tuple) else out).detach()
            return hook

        for layer in sorted(set(self.layer_of.values())):
            block = self.layers[layer]
            self._temp.append(block.self_attn.q_proj.register_forward_hook(keep("q", layer)))
            self._temp.append(block.self_attn.k_proj.register_forward_hook(keep("k", layer)))
            self._temp.append(block.register_forward_hook(keep("h", layer)))
        self._temp.append(self.projector.register_forward_hook(self._projected))

    def _projected(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        self.drop()
        cap = self._local.capture
        self._local.capture = None
        if args and isinstance(args[0], torch.Tensor):
            cap["in"] = args[0].detach()
        h = self.handle
        state = h.state
        live = state is not None and state.phase is not Phase.DECODE and h._busy_thread == threading.get_ident()
        if not live:  # generate encodes the images before the prefill: the calls see them at its start
            self._local.pending = (cap, output)
            return None
        if self._done is not None and self._done[0] is state:  # a second tower run of this call (a pre-pass)
            return self._done[1]
        new = self._deliver(state, cap, output, in_place=False)
        self._done = (state, new)
        return new

    def start_call(self, state: CallState, inputs: dict[str, Any]) -> None:
        """At the prefill's start: hand the calls what `generate` encoded before it (`mm_encoder_outputs` in
        `inputs`; edits in place). A capture left by an encoding whose prefill never came is dropped."""
        pending = getattr(self._local, "pending", None)
        self._done = None
        self._local.pending = None
        if pending is None or not inputs.get("mm_encoder_outputs"):
            return
        cap, output = pending
        self._done = (state, self._deliver(state, cap, output, in_place=True))

    # -- delivery ----------------------------------------------------------------------------------
    def _images(self, state: CallState, cap: dict, output: torch.Tensor, layer: int | None) -> list[VisionImage]:
        n_img, n_tok = output.shape[0], output.shape[1]
        where: list[tuple[int, int, torch.Tensor]] = []
        for row in state.rows:
            pos = row.image_positions
            where += [(row.index, j, pos[j * n_tok:(j + 1) * n_tok]) for j in range(len(pos) // n_tok)]
        if len(where) != n_img:
            raise VlmfixError(f"the vision tower encoded {n_img} images of {n_tok} tokens but the prompt holds "
                              f"{len(where)} such images; vision-side methods need one prompt image per encoded "
                              "image (no num_beams / num_return_sequences expansion)")
        q = cap["q"].get(layer) if layer is not None else None
        tokens = q.shape[1] if q is not None else None
        tmap = self.adapter.vision_token_map(tokens) if tokens is not None else torch.zeros(0, dtype=torch.long)
        out = []
        attn = self.layers[layer].self_attn if q is not None else None
        given = cap.get("in")
        one_to_one = given is not None and tuple(given.shape[:2]) == (n_img, n_tok)
        for k, (row, j, pos) in enumerate(where):
            img = VisionImage(k, row, j, pos, output[k], tmap, layer)
            if one_to_one:
                img.projector_input = given[k]
            if q is not None:
                heads = int(getattr(attn, "num_heads", None) or attn.num_attention_heads)
                d = q.shape[-1] // heads
                img.queries = q[k].float().view(tokens, heads, d).transpose(0, 1)
                img.keys = cap["k"][layer][k].float().view(tokens, heads, d).transpose(0, 1)
                img.hidden = cap["h"][layer][k]
                img.scale = float(getattr(attn, "scale", None) or getattr(attn, "scaling", None) or d ** -0.5)
            out.append(img)
        return out

    def _deliver(self, state: CallState, cap: dict, output: torch.Tensor, in_place: bool) -> torch.Tensor:
        """The calls read, then edit (in the runtimes' order); the features to scatter."""
        readers = [c for c in state.calls if isinstance(c, ReadsVision)]
        editors = [c for c in state.calls if isinstance(c, EditsFeatures)]
        if not readers and not editors:
            return output
        by_layer: dict[int | None, list[VisionImage]] = {}

        def images(layer: int | None) -> list[VisionImage]:
            if layer not in by_layer:
                by_layer[layer] = self._images(state, cap, output, layer)
            return by_layer[layer]

        for c in readers:
            c.read_vision(state, images(self.layer_of[id(c.runtime)]))
        if not editors:
            return output
        feats = list(output.unbind(0))
        changed = False
        for c in editors:
            layer = self.layer_of.get(id(c.runtime))
            for img in images(layer):
                new = c.edit_features(state, img, feats[img.index])
                if new is None:
                    continue
                if new.shape != feats[img.index].shape:
                    raise ValueError(f"{type(c).__name__}.edit_features returned features of shape {tuple(new.shape)} "
                                     f"for image {img.index}; it must keep {tuple(feats[img.index].shape)}")
                feats[img.index], changed = new.to(output.dtype), True
        if not changed:
            return output
        new = torch.stack(feats)
        if not in_place:
            return new
        with torch.no_grad():
            output.copy_(new)
        return output
