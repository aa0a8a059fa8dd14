"""Test-only methods that exercise the eager-query path without changing attention."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmfix.methods.base import EditsQueries, MethodCall, MethodConfig, Runtime
from vlmfix.methods.registry import register_method


def on_edit(runtime, wrapper) -> None:
    """Make every call of `runtime` edit through `wrapper(edit, block, state, queries, probs)` (`edit` is the
    call's own)."""
    start = runtime.start

    def starting(state):
        call = start(state)
        edit = call.edit
        call.edit = lambda block, state, queries, probs: wrapper(edit, block, state, queries, probs)
        return call

    runtime.start = starting


def observed(config_cls: type) -> type:
    """`config_cls` (a method config whose calls edit queries) with a `seen` list of each edit it made:
    (block, prompt positions of the queries (None at a decoding step), the rows before (a copy), after, the
    prompt length), and `bound`, the runtime it was last bound to."""

    @dataclass
    class Observed(config_cls):
        seen: list = field(default_factory=list, repr=False)

        def bind(self, target):
            runtime = self.bound = super().bind(target)

            def recording(edit, block, state, queries, probs):
                before = probs.clone()  # the edit may work in place
                out = edit(block, state, queries, probs)
                positions = None if queries.positions is None else queries.positions.tolist()
                self.seen.append((block, positions, before, out.clone(), state.prompt_len))
                return out

            on_edit(runtime, recording)
            return runtime

    Observed.__name__ = Observed.__qualname__ = f"Observed{config_cls.__name__}"
    return Observed


@dataclass
class EveryRow(MethodConfig):
    """Asks for every query row at every layer, in prefill and decode, and records the probs of
    the last query; changes nothing. Its outputs must equal the fast path's."""

    seen: list = field(default_factory=list)


class _EveryRowCall(MethodCall, EditsQueries):
    def queries(self, block, state):
        return range(block.q_len)

    def edit(self, block, state, queries, probs):
        positions = () if queries.positions is None else tuple(queries.positions.tolist())
        self.runtime.config.seen.append((block.phase.value, block.layer, positions, probs[:, :, -1].clone()))
        return probs


class _EveryRow(Runtime):
    call = _EveryRowCall


@dataclass
class LastRow(MethodConfig):
    """Asks only for the last query (a decode-step shape) and changes nothing."""


class _LastRowCall(MethodCall, EditsQueries):
    def queries(self, block, state):
        return range(block.q_len - 1, block.q_len)

    def edit(self, block, state, queries, probs):
        return probs


class _LastRow(Runtime):
    call = _LastRowCall


register_method(name="every_row", config=EveryRow, runtime=_EveryRow, listed=False)
register_method(name="last_row", config=LastRow, runtime=_LastRow, listed=False)


def lmms_eval_logs(methods: str, max_new_tokens: int = 3, batch_size: int = 2) -> list[dict]:
    """lmms-eval's vlmfix model on the demo VLM with `methods=...` answers one batch of two requests (two images of
    different aspect ratios): each request's sample log (its `vlmfix` entry: the methods' records of its row)."""
    import pytest

    pytest.importorskip("lmms_eval")
    from types import SimpleNamespace

    from PIL import Image

    from vlmfix.integrations.lmms_eval import VlmfixLMM

    lmm = VlmfixLMM.create_from_arg_string(f"pretrained=demo,methods={methods}",
                                           {"batch_size": batch_size, "device": None})
    try:
        docs = {0: Image.new("RGB", (96, 64), (200, 40, 40)), 1: Image.new("RGB", (64, 96), (40, 160, 60))}
        lmm.task_dict = {"task": {"test": docs}}
        gen = {"max_new_tokens": max_new_tokens, "until": ["\n"]}
        requests = [SimpleNamespace(args=(f"What is in the image? {i}", gen, lambda doc: [doc], i, "task", "test"))
                    for i in docs]
        results = lmm.generate_until(requests)
    finally:
        lmm.detach()
    return [r.token_counts.to_dict()["vlmfix"] for r in results]


def assert_forms_agree_and_mask_compiles(model, make_config, prompts, gen: dict) -> None:
    """A pre-decoder pruner (`make_config(form)`) on a llava batch of `prompts`: the mask form (nothing moves; pruned
    tokens masked as keys from layer 0 on) chooses the in-place form's tokens and gives its tokens and logits; under
    a static cache it gives the eager tokens, also compiled and on a second batch; the in-place form is refused
    there, naming the mask form."""
    import pytest
    import torch
    from test_runtime import compile_config, other_batch
    from tiny import make_batch

    import vlmfix
    from vlmfix.methods.prune import kept_tokens

    batch = make_batch("llava", model, prompts)
    batch2 = other_batch("llava", model, prompts)
    runs = {}
    for form in ("inplace", "mask"):
        config = make_config(form)
        with vlmfix.attach(model, None, config) as fixed:
            out = fixed.generate(**batch, **gen)
            state = fixed.last_state
            kept = [kept_tokens(state, r).tolist() for r in range(state.batch_size)]
            runs[form] = (out.sequences, torch.stack(out.logits), kept)
            if form == "inplace":
                with pytest.raises(vlmfix.VlmfixError, match=f"{type(config).__name__}.*use form='mask'"):
                    fixed.generate(**batch, **gen, cache_implementation="static")
            else:
                static = fixed.generate(**batch, **gen, cache_implementation="static", disable_compile=True)
                static2 = fixed.generate(**batch2, **gen, cache_implementation="static", disable_compile=True)
                compiled = fixed.generate(**batch, **gen, cache_implementation="static", compile_config=compile_config())
                compiled2 = fixed.generate(**batch2, **gen, cache_implementation="static",
                                           compile_config=compile_config())
    assert runs["inplace"][2] == runs["mask"][2] and torch.equal(runs["inplace"][0], runs["mask"][0])
    torch.testing.assert_close(runs["inplace"][1], runs["mask"][1], atol=1e-4, rtol=0)
    assert torch.equal(static.sequences, runs["mask"][0])
    assert torch.equal(compiled.sequences, static.sequences) and torch.equal(compiled2.sequences, static2.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(static.logits), atol=1e-4, rtol=0)


def assert_pruned_tokens_are_never_sinks(model, pruner, prompts, gen: dict, dropped: int):
    """VAR and GIFT beside `pruner` on a llava batch of `prompts` keep naming tokens by prompt position: the run
    generates, each row drops `dropped` image tokens, a dropped token has phi 0 in every layer and no GIFT saliency.
    Returns the call's state."""
    import torch
    from tiny import make_batch, tokenizer

    import vlmfix
    from vlmfix.methods.prune import kept_tokens

    batch = make_batch("llava", model, prompts)
    var = vlmfix.VAR(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3))
    gift = vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))
    with vlmfix.attach(model, tokenizer(), [var, gift, pruner], sink_dims=[0, 1]) as fixed:
        out = fixed.generate(**batch, **gen)
        state = fixed.last_state
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + gen["max_new_tokens"]
    for r, row in enumerate(state.rows):
        gone = row.image_positions[~torch.isin(row.image_positions, kept_tokens(state, r))]
        assert len(gone) == dropped
        for layer, phi in state.phi.items():
            assert bool((phi[r, gone] == 0).all()), f"a pruned token has phi at layer {layer}"
        sal = vlmfix.GIFT.saliency(state, r)
        if sal is not None:
            assert bool((sal.flatten()[torch.searchsorted(row.image_positions, gone)] == 0).all())
    return state
