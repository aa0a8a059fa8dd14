"""LoRA on the decoder's linear layers (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"): y = W x + (alpha / r) * B A x, with A (r, in) and B (out, r), B starting at 0.

Training wraps the targets in `LoRALinear`; the demo VLM ships only (A, B) and `merge_lora` folds
them into W at load time (W <- W + (alpha / r) B A), so the loaded model is a plain transformers
model with no extra modules and no extra cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update of rank r, scaled by alpha / r."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def _targets(decoder: nn.Module, targets: tuple[str, ...]):
    for name, module in decoder.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and isinstance(child, (nn.Linear, LoRALinear)):
                yield f"{name}.{child_name}" if name else child_name, module, child_name, child


def add_lora(decoder: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = TARGETS) -> list[nn.Parameter]:
    """Wrap every target linear of `decoder` in a `LoRALinear`; returns the new parameters."""
    params: list[nn.Parameter] = []
    for _, parent, child_name, child in list(_targets(decoder, targets)):
        if isinstance(child, LoRALinear):
            raise ValueError(f"{child_name} already has LoRA")
        wrapped = LoRALinear(child, rank, alpha).to(child.weight.device)
        setattr(parent, child_name, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    if not params:
        raise ValueError(f"no linear layer named {targets} in the decoder")
    return params


def lora_state(decoder: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module path>.lora_a" / ".lora_b": tensor} of every wrapped layer."""
    state = {}
    for path, _, _, child in _targets(decoder, TARGETS):
        if isinstance(child, LoRALinear):
            state[f"{path}.lora_a"] = child.lora_a.detach()
            state[f"{path}.lora_b"] = child.lora_b.detach()
    return state


def remove_lora(decoder: nn.Module) -> None:
    """Fold every `LoRALinear` into its base layer (W <- W + scale B A) and unwrap it."""
    with torch.no_grad():
        for _, parent, child_name, child in list(_targets(decoder, TARGETS)):
            if isinstance(child, LoRALinear):
                child.base.weight += (child.lora_b @ child.lora_a * child.scale).to(child.base.weight.dtype)
                setattr(parent, child_name, child.base)


@torch.no_grad()
def merge_lora(decoder: nn.Module, state: dict[str, torch.Tensor], alpha: float) -> int:
    """Add (alpha / r) B A of each (A, B) pair in `state` to the weight of the decoder's linear at
    that path; returns how many layers were updated. Raises when a path is missing."""
    modules = dict(decoder.named_modules())
    updated = 0
    for key in sorted(k for k in state if k.endswith(".lora_a")):
        path = key[: -len(".lora_a")]
        layer = modules.get(path)
        if not isinstance(layer, nn.Linear):
            raise KeyError(f"LoRA weights for {path!r}, but the decoder has no linear layer there")
        a, b = state[key].float(), state[f"{path}.lora_b"].float()
        layer.weight += (b @ a * (alpha / a.shape[0])).to(layer.weight.dtype)
        updated += 1
    return updated
