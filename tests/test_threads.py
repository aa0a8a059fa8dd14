"""Threads sharing one attached model: `fixed.generate` calls take turns and each gets its own result;
plain `model.generate` calls that would mix their state are refused, never answered wrongly."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import PAD, chat_after, make_batch, make_model, tokenizer

import vlmfix
from vlmfix.core.attach import VlmfixError

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD)
VAR_TINY = dict(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3))  # makes VAR act on the tiny model (see test_var)


def methods():
    return [vlmfix.VAR(**VAR_TINY), vlmfix.GIFT(alpha=5.0, saliency_layers=(1,), boost_layers=(2, 3)),
            vlmfix.FastVPrune(layer=1, keep=8, form="mask")]


def prompts(model) -> list[dict]:
    """Four one-row batches of different lengths and images (so a mixed state gives other tokens)."""
    sizes = [(30, 30), (40, 70), (60, 30), (50, 50)]
    return [make_batch("llava", model, [([1, 5 + k], size, chat_after())]) for k, size in enumerate(sizes)]


def hammer(call, batches, threads: int = 2, rounds: int = 4) -> list[tuple[int, object]]:
    """Each thread calls `call(batch)` on every batch `rounds` times; returns (batch index, result or error)."""
    results: list[tuple[int, object]] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work(offset: int) -> None:
        start.wait()
        for r in range(rounds):
            for k in range(len(batches)):
                i = (k + offset + r) % len(batches)
                try:
                    got: object = call(batches[i])
                except Exception as e:  # noqa: BLE001 - the test sorts what was raised
                    got = e
                with lock:
                    results.append((i, got))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return results


@pytest.fixture(scope="module")
def setup():
    model = make_model("llava")
    batches = prompts(model)
    with vlmfix.attach(model, tokenizer(), methods()) as fixed:
        alone = [fixed.generate(**b, **GEN) for b in batches]
    plain = [model.generate(**b, **GEN) for b in batches]
    assert any(not torch.equal(a, p) for a, p in zip(alone, plain)), "the methods must change some tokens here"
    return model, batches, alone


def test_fixed_generate_takes_turns(setup):
    """Two threads through `fixed.generate`: every call gives exactly the tokens of that prompt run alone."""
    model, batches, alone = setup
    with vlmfix.attach(model, tokenizer(), methods()) as fixed:
        results = hammer(lambda b: fixed.generate(**b, **GEN), batches)
    assert len(results) == 2 * 4 * len(batches)
    for i, got in results:
        assert isinstance(got, torch.Tensor), f"call on prompt {i} raised {got!r}"
        assert torch.equal(got, alone[i]), f"prompt {i}: a call returned another call's tokens"


def test_plain_generate_never_mixes(setup):
    """Two threads through plain `model.generate` while attached: each call gives its own tokens or a
    VlmfixError that says what to do; never another call's tokens, never an internal error."""
    model, batches, alone = setup
    with vlmfix.attach(model, tokenizer(), methods()):
        results = hammer(lambda b: model.generate(**b, **GEN), batches)
    for i, got in results:
        if isinstance(got, Exception):
            assert isinstance(got, VlmfixError), f"prompt {i}: internal error {got!r}"
            assert "fixed.generate" in str(got)
        else:
            assert torch.equal(got, alone[i]), f"prompt {i}: a call returned tokens from a mixed state"


def test_forward_released_after_error(setup):
    """A forward that raises frees the attached model for the next one (in any thread)."""
    model, batches, alone = setup
    with vlmfix.attach(model, tokenizer(), methods()) as fixed:
        cut = dict(batches[0], input_ids=batches[0]["input_ids"][:, :10], attention_mask=None)  # half an image
        with pytest.raises(ValueError, match="image tokens"):
            fixed.generate(**cut, **GEN)
        out: list = []
        t = threading.Thread(target=lambda: out.append(fixed.generate(**batches[1], **GEN)))
        t.start()
        t.join()
        assert torch.equal(out[0], alone[1])


def test_detached_handle_refuses_calls(setup):
    model, batches, _ = setup
    fixed = vlmfix.attach(model, tokenizer(), methods())
    fixed.detach()
    with pytest.raises(VlmfixError, match="detached"):
        fixed(**batches[0])
    with pytest.raises(VlmfixError, match="detached"):
        fixed.generate(**batches[0], **GEN)
