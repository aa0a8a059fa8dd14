"""A slow reference implementation of VAR as the paper specifies it (see vlmfix/methods/var.py), independent of vlmfix's attention path.

It registers its own attention function ("var_reference"): full eager attention for every row
(all attention maps materialised), then plain Python loops over batch rows, heads and query rows
apply the spec. Sink scores come from its own hooks on the decoder layers.
"""

from __future__ import annotations

import contextlib
import math

import torch
from reference_attention import eager_probs, routed, visual_ids

NAME = "var_reference"


class Reference:
    def __init__(self, model, dims, tau, rho=0.5, p=0.6, m_min=0.2, sources="all", layers=None):
        self.model = model
        self.dims, self.tau, self.rho, self.p, self.m_min, self.sources = dims, tau, rho, p, m_min, sources
        n = model.config.get_text_config().num_hidden_layers
        self.layers = set(range(2, n - 1)) if layers is None else set(layers)
        self.rows = {}  # (step, layer) -> {(b, h, i): modified row}
        self.step = -1

    # sinks: phi > tau on the RMS-normalised residual stream entering each layer, prefill only
    def prefill(self, ids):
        self.ids = ids
        self.prompt_len = ids.shape[1]
        self.sinks = {}
        self.step = -1

    def phi_hook(self, layer):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).float()
            if x.shape[1] != self.prompt_len or layer < 2:
                return
            sinks = []
            for b in range(x.shape[0]):
                row = set()
                for j in range(x.shape[1]):
                    rms = math.sqrt(float((x[b, j] ** 2).mean()) + 1e-6)
                    phi = max(abs(float(x[b, j, d])) / rms for d in self.dims)
                    if phi > self.tau:
                        row.add(j)
                sinks.append(row)
            self.sinks[layer] = sinks
        return hook

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        probs, v, q_start = eager_probs(query, key, value, attention_mask, scaling)
        layer = module.layer_idx
        if layer == 0:
            self.step += 1
        if layer in self.layers and self.p > 0:
            probs = self.redistribute(layer, probs, q_start)
        out = torch.matmul(probs, v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    def redistribute(self, layer, probs, q_start):
        probs = probs.clone()
        done = self.rows.setdefault((self.step, layer), {})
        for b in range(probs.shape[0]):
            image = self.image_positions(b)
            if not image:
                continue
            for h in range(probs.shape[1]):
                for i in range(probs.shape[2]):
                    if q_start + i < image[-1] + 1:
                        continue
                    probs[b, h, i] = self.row(probs[b, h, i], image, self.sinks[layer][b])
                    done[(b, h, q_start + i)] = probs[b, h, i].clone()
        return probs

    def image_positions(self, b):
        visual = visual_ids(self.model)
        return [j for j in range(self.prompt_len) if int(self.ids[b, j]) in visual]

    def row(self, row, image, sinks):
        """The spec on one post-softmax row: selection, then redistribution (a new tensor)."""
        visual = [j for j in image if j in sinks]
        non = [j for j in image if j not in sinks]
        source = sorted(sinks) if self.sources == "all" else visual
        a_img = sum(float(row[j]) for j in image)
        a_vis = sum(float(row[j]) for j in visual)
        a_non = sum(float(row[j]) for j in non)
        ratio = 1 - a_vis / (a_img + 1e-6)
        new = row.clone()
        if visual and ratio >= self.rho and a_img >= self.m_min and a_non > 0:
            omega = self.p * sum(float(row[j]) for j in source)
            for j in source:
                new[j] = (1 - self.p) * row[j]
            for j in non:
                new[j] = row[j] + omega * row[j] / a_non
        return new


@contextlib.contextmanager
def reference_var(model, **config):
    """Run `model` with the reference VAR (restores its attention implementation afterwards)."""
    ref = Reference(model, **config)
    hooks = [model.register_forward_pre_hook(
        lambda m, a, kw: ref.prefill(kw["input_ids"]) if kw.get("input_ids") is not None
        and kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)]
    layers = model.get_decoder().layers
    hooks += [layer.register_forward_pre_hook(ref.phi_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with routed(model, NAME, ref.attention):
            yield ref
    finally:
        for h in hooks:
            h.remove()
