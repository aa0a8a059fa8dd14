"""A LLaVA on SmolLM2 with visual sinks where we put them.

Image features are replaced by embeddings of ordinary content words (on which SmolLM2's sink
score phi stays below ~20.5), and a hook writes a massive value into the sink dimension at chosen
image positions of the residual stream entering layer 2 (planted tokens reach phi ~ 24, the ceiling
for a 576-wide LM). Giving an image position the BOS embedding does not make it a sink; this does.
"""

from __future__ import annotations

import contextlib

import torch

WORDS = ("apple river mountain garden window yellow bicycle teacher orange planet music forest candle winter "
         "ocean pencil coffee animal morning doctor silver castle flower basket").split()
SINK_DIM = 507
TAU = 21.5  # between the content words' phi (< 20.5) and the planted tokens' (~24)


@contextlib.contextmanager
def planted_sinks(model, tokenizer, planted: dict[int, list[int]], seed: int = 0, *, sink_dim: int = SINK_DIM,
                  value: float = 1000.0):
    """While active, batch row b gets sinks at its image tokens number planted[b] (from layer 2 on): `value`
    written into `sink_dim` (SmolLM2's by default). The features are the words' input embeddings as the
    LM's embedding layer gives them (Gemma's scales them)."""
    vocab = [tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in WORDS]
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(torch.tensor(vocab))
    image_id = model.config.image_token_id
    seen = {}

    def features(module, args, output):
        # the same words for every image, so a prompt alone and in a batch see the same features
        pick = torch.randint(0, len(WORDS), output.shape[-2:-1], generator=torch.Generator().manual_seed(seed))
        return embeddings[pick].expand(output.shape).to(output.dtype)

    def grab_ids(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:  # the prefill
            seen["ids"] = ids

    def plant(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        ids = seen.get("ids")
        if ids is None or hidden.shape[1] != ids.shape[1]:
            return None
        hidden = hidden.clone()
        for row, idx in planted.items():
            image = (ids[row] == image_id).nonzero().flatten()
            hidden[row, image[idx], sink_dim] = value
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    hooks = [
        model.model.multi_modal_projector.register_forward_hook(features),
        model.register_forward_pre_hook(grab_ids, with_kwargs=True),
        model.model.language_model.layers[2].register_forward_pre_hook(plant, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
