"""A slow reference implementation of SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417), written from the
paper's description (the choices are those of vlmfix.methods.sparsevlm's docstring):

1. raters: from the input embeddings H (entering decoder layer 0), for each candidate text token t,
   r_t = mean over image tokens v of exp(<h_v, h_t> / sqrt(D)) / sum_t' exp(<h_v, h_t'> / sqrt(D));
   the raters are the t with r_t >= mean(r);
2. at each stage layer L: s_j = mean over raters i of mean over heads of A_i,j (eager fp32 attention of layer
   L - 1); the rank of P (raters x image tokens still present) gives the rank count n - ceil(lambda (n - rank));
   the stage keeps max(budget, that) tokens; of them k are recycled: the best-rated ceil(tau d) of the d tokens
   below the top (keep - k) are clustered by DPC-kNN (a plain loop here) on the hidden states entering L, each
   cluster becomes one token at its centre carrying the mean of its members;
3. from L on the deleted tokens are gone: here every layer >= L masks them out as keys (a model fed only the
   kept and merged tokens from L on), and the centres' hidden states entering L are replaced.

Deliberately literal and slow: one prompt, no cache, one full forward per stage (each with the earlier stages
applied), plain loops. Returns the selection and the last position's logits of the final forward.
"""

from __future__ import annotations

import math

import torch
from reference_attention import eager_probs, routed, visual_ids

NAME = "sparsevlm_reference"


def raters_reference(embeddings: torch.Tensor, image: list[int], text: list[int]) -> list[int]:
    d = embeddings.shape[-1]
    r = [0.0] * len(text)
    for v in image:  # one softmax over the text tokens per image token
        logits = [float(embeddings[v].double() @ embeddings[u].double()) / math.sqrt(d) for u in text]
        top = max(logits)
        z = sum(math.exp(x - top) for x in logits)
        for k, x in enumerate(logits):
            r[k] += math.exp(x - top) / z / len(image)
    mean = sum(r) / len(r)
    return [t for t, x in zip(text, r) if x >= mean]


def dpc_knn_reference(x: torch.Tensor, clusters: int, neighbours: int) -> tuple[list[int], list[int]]:
    """(centres, assignment) by density peaks with kNN density, in plain loops (ties: lower index first)."""
    m = len(x)
    x = x.double()
    dist = [[math.sqrt(float(((x[i] - x[j]) ** 2).sum())) for j in range(m)] for i in range(m)]
    nn = min(neighbours, m - 1)
    rho = []
    for i in range(m):
        near = sorted(dist[i][j] for j in range(m) if j != i)[:nn]
        rho.append(math.exp(-sum(v * v for v in near) / nn) if nn else 1.0)
    order = sorted(range(m), key=lambda i: (-rho[i], i))
    delta = [0.0] * m
    for k, i in enumerate(order):
        delta[i] = max(dist[i]) if k == 0 else min(dist[i][j] for j in order[:k])
    gamma = [rho[i] * delta[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-gamma[i], i))[:clusters]
    assign = []
    for i in range(m):
        if i in centres:
            assign.append(centres.index(i))
        else:
            best = min(range(len(centres)), key=lambda c: (dist[i][centres[c]], c))
            assign.append(best)
    return centres, assign


class _Pruned:
    """The attention function of a forward with the stages so far: eager fp32, deleted tokens masked out as keys
    from each stage's layer on; the probabilities of `record_layer` kept."""

    def __init__(self, model):
        self.index = {id(layer.self_attn): i for i, layer in enumerate(model.get_decoder().layers)}
        self.stages: list[tuple[int, set[int]]] = []  # (layer, the positions deleted from it on)
        self.record_layer: int | None = None
        self.probs = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = self.index[id(module)]
        kv_len = key.shape[2]
        mask = torch.ones(1, 1, query.shape[2], kv_len, dtype=torch.bool)
        q = torch.arange(kv_len - query.shape[2], kv_len)
        mask &= (torch.arange(kv_len)[None, :] <= q[:, None])[None, None]
        for start, deleted in self.stages:
            if layer >= start:
                for j in deleted:
                    mask[..., j] = False
                for i in range(query.shape[2]):
                    if not bool(mask[0, 0, i].any()):
                        mask[0, 0, i, int(q[i])] = True
        probs, v, _ = eager_probs(query, key, value, mask, scaling)
        if layer == self.record_layer:
            self.probs = probs
        return torch.matmul(probs, v).to(query.dtype).transpose(1, 2).contiguous(), None


@torch.no_grad()
def sparsevlm_reference(model, inputs, layers, budgets, rank_scale=1.0, recycle_ratio=0.3, cluster_ratio=0.1,
                        neighbours=5):
    """One prompt (batch of 1, no padding). Returns (raters, per stage (kept positions, {centre: members}),
    last-position logits (V,) of the pruned forward)."""
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1, "one prompt at a time"
    image = torch.isin(ids[0], torch.tensor(sorted(visual_ids(model)))).nonzero().flatten().tolist()
    text = list(range(image[-1] + 1, ids.shape[1]))
    attention = _Pruned(model)
    decoder = model.get_decoder().layers
    rewrites: dict[int, dict[int, torch.Tensor]] = {}

    def rewrite_hook(layer):
        def hook(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            for pos, feat in rewrites.get(layer, {}).items():
                hidden[0, pos] = feat
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook

    handles = [decoder[layer].register_forward_pre_hook(rewrite_hook(layer), with_kwargs=True) for layer in layers]
    try:
        with routed(model, NAME, attention):
            out = model(**inputs, use_cache=False, output_hidden_states=True)
            raters = raters_reference(out.hidden_states[0][0], image, text)
            alive = list(image)
            stages = []
            for stage, layer in enumerate(layers):
                attention.record_layer = layer - 1
                out = model(**inputs, use_cache=False, output_hidden_states=True)
                a = attention.probs[0].mean(0)  # (Q, K) over heads
                scores = {j: sum(float(a[i, j]) for i in raters) / len(raters) for j in alive}
                n = len(alive)
                keep = min(budgets[stage], n)
                if rank_scale is not None and keep < n:
                    p = torch.tensor([[float(a[i, j]) for j in alive] for i in raters], dtype=torch.float64)
                    rank = int(torch.linalg.matrix_rank(p))
                    keep = max(keep, n - min(n, math.ceil(rank_scale * (n - rank) - 1e-9)))
                ranked = sorted(alive, key=lambda j: (-scores[j], j))
                clusters = 0
                if keep < n and recycle_ratio > 0:
                    recycled = math.ceil(recycle_ratio * (n - keep) - 1e-9)
                    clusters = min(math.ceil(cluster_ratio * recycled - 1e-9), recycled, keep - 1)
                top = ranked[:keep - max(clusters, 0)]
                groups = {}
                if clusters >= 1:
                    candidates = sorted(ranked[keep - clusters:keep - clusters + recycled])
                    hidden = out.hidden_states[layer][0]  # entering layer L
                    centres, assign = dpc_knn_reference(hidden[candidates], clusters, neighbours)
                    rewrites[layer] = {}
                    for c, centre in enumerate(centres):
                        members = [candidates[i] for i in range(len(candidates)) if assign[i] == c]
                        groups[candidates[centre]] = members
                        rewrites[layer][candidates[centre]] = hidden[members].float().mean(0).to(hidden.dtype)
                kept = sorted(top + list(groups))
                attention.stages.append((layer, set(alive) - set(kept)))
                alive = kept
                stages.append((kept, groups))
            attention.record_layer = None
            logits = model(**inputs, use_cache=False).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()
    return raters, stages, logits
