"""The user's question is the text of the last user turn (`Adapter.question`), wherever the image stands
in it, on every chat template the tests have: each tiny family's (tests/families/processors.py: rendered
by its tokenizer and template, and through the whole processor where transformers builds it here) and
the demo VLM's. GIFT reads its saliency from the question's tokens after the image and leaves a row
whose question precedes the image, or whose last turn holds no text, exactly as it is, saying why."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from families.processors import SPECS, make_model, make_processor, tokenizer
from PIL import Image
from reference_gift import saliency
from test_gift import generate
from tiny import QUESTION

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.core.state import runs

IMAGE = {"type": "image"}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


def conversation(case: str, question: str, first: str, before: str, after: str, answer: str) -> list[dict]:
    """The messages of `case` whose last user turn asks `question` (`before` + `after` around the image
    in "between"); `first` is an earlier question about the image, `answer` the assistant's reply."""
    earlier = [{"role": "user", "content": [IMAGE, text(first)]}, {"role": "assistant", "content": [text(answer)]}]
    last = {"after": [IMAGE, text(question)], "before": [text(question), IMAGE],
            "between": [text(before), IMAGE, text(after)], "earlier turn": [text(question)], "no text": [IMAGE]}[case]
    return (earlier if case in ("earlier turn", "no text") else []) + [{"role": "user", "content": last}]


CASES = ("after", "before", "between", "earlier turn", "no text")
#: the tiny vocabulary's spelling: words with a leading space; the question split around the image in "between"
TINY = dict(question=QUESTION, first=" Is there a dog?", before=" Is there a red cat", after=" in the picture?",
            answer=" a red dog")


def check(ids: torch.Tensor, row_question, tok, case: str, question: str) -> None:
    """The question's positions decode to exactly `question` (its pieces too), apart only around the image."""
    if case == "no text":
        assert row_question is None
        return
    positions, pieces = row_question
    assert tok.decode(ids[positions]) == "".join(pieces) == question
    assert len(runs(positions)) == (2 if case == "between" else 1)


@lru_cache(maxsize=None)
def family_adapter(family: str):
    spec = SPECS[family]
    tok = tokenizer(spec.names, **spec.named)
    return get_adapter(make_model(family), tok), tok


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", tuple(SPECS))
def test_question_on_each_family_template(family, case):
    """Each family's chat template, rendered by its tokenizer (the image placeholder unexpanded)."""
    adapter, tok = family_adapter(family)
    prompt = tok.apply_chat_template(conversation(case, **TINY), chat_template=SPECS[family].chat_template(),
                                     add_generation_prompt=True, tokenize=False)
    ids = torch.tensor(tok(prompt, add_special_tokens=False).input_ids)
    check(ids, adapter.question(ids), tok, case, QUESTION)


BUILT = tuple(f for f, spec in SPECS.items() if not spec.needs_torchvision)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", BUILT)
def test_question_in_processed_prompts(family, case):
    """The same through each buildable family processor (images expanded: Gemma 3's blank lines around
    the image, Idefics3's tile tags) and the adapter's row layout."""
    processor = make_processor(family)
    messages = conversation(case, **TINY)
    images = [Image.new("RGB", (48, 40), "red")] * sum(c == IMAGE for m in messages for c in m["content"])
    inputs = processor(images=images, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    row = get_adapter(make_model(family), processor).row_layouts(inputs)[0]
    question = None if row.query_positions is None else (row.query_positions, row.query_pieces)
    check(inputs["input_ids"][0], question, processor.tokenizer, case, QUESTION)


def test_qwen3_vl_video_timestamps_are_not_the_question():
    """Qwen3-VL's processor writes "<t seconds>" before each video frame, the first one before the video's
    tokens: no part of the question, wherever the video stands."""
    from families.common import VIDEO, qwen_batch
    from families.qwen3_vl import make_model as qwen3_model
    from tiny import encode, tokenizer as tiny_tokenizer, user_turn

    batch = qwen_batch([(user_turn() + encode(" Is there a red cat"), (4, 56, 84), encode(" in the picture?"))],
                       video=True, frames_apart=True)
    ids = batch["input_ids"][0]
    assert int((ids == VIDEO).sum()) > 0 and "<0.5 seconds>" in tiny_tokenizer().decode(ids)
    row = get_adapter(qwen3_model(), tiny_tokenizer()).row_layouts(batch)[0]
    check(ids, (row.query_positions, row.query_pieces), tiny_tokenizer(), "between", QUESTION)


# -- the demo VLM -----------------------------------------------------------------------------------------
DEMO = dict(question="Is there a dog in the image?", first="Is there a cow in the image?", before="Look:",
            after="Is there a dog in the image?", answer="No.")


@pytest.fixture(scope="module")
def demo():
    return vlmfix.load_demo()


def demo_inputs(processor, cases: list[str]) -> dict:
    """A left-padded batch of the demo's chat prompts, one per case, with one blank image per image item."""
    processor.tokenizer.padding_side = "left"
    messages = [conversation(case, **DEMO) for case in cases]
    images = [Image.new("RGB", (80, 60), "blue") for m in messages for turn in m for c in turn["content"] if c == IMAGE]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


@pytest.mark.parametrize("case", CASES)
def test_question_on_the_demo_template(demo, case):
    model, processor = demo
    inputs = demo_inputs(processor, [case])
    row = get_adapter(model, processor).row_layouts(inputs)[0]
    question = None if row.query_positions is None else (row.query_positions, row.query_pieces)
    want = DEMO["before"] + DEMO["after"] if case == "between" else DEMO["question"]
    check(inputs["input_ids"][0], question, processor.tokenizer, case, want)


def last_occurrence(ids: torch.Tensor, tok, words: str) -> list[int]:
    """The positions of the last occurrence of `words`' tokens in `ids` (found without the adapter)."""
    needle = tok(words, add_special_tokens=False).input_ids
    starts = [s for s in range(len(ids) - len(needle) + 1) if ids[s : s + len(needle)].tolist() == needle]
    return list(range(starts[-1], starts[-1] + len(needle)))


def test_gift_question_before_the_image_leaves_the_row_unchanged(demo):
    """Reproducer (a) of issue 19: the question written before the image cannot attend to it, so GIFT has
    no gaze shift to read: that row keeps the plain model's logits and its note says why; a row asking
    after the image, in the same batch, is boosted."""
    model, processor = demo
    inputs = demo_inputs(processor, ["before", "after"])
    plain = generate(model, inputs)
    with vlmfix.attach(model, processor, vlmfix.GIFT()) as fixed:
        got = generate(fixed, inputs)
        state = fixed.last_state
    record = state.record(vlmfix.GIFT)
    assert "the question precedes the image" in record.note(0) and "causal attention" in record.note(0)
    assert vlmfix.GIFT.saliency(state, 0) is None and record.note(1) == ""
    assert torch.equal(got[0][0], plain[0][0]) and torch.allclose(got[1][:, 0], plain[1][:, 0], atol=1e-4, rtol=0)
    assert (got[1][:, 1] - plain[1][:, 1]).abs().max() > 1e-2, "GIFT changed nothing on the row asking after the image"


@pytest.mark.parametrize("case, words", [("earlier turn", "Is there a dog in the image?"),
                                         ("between", "Is there a dog in the image?")])
def test_gift_saliency_reads_the_last_question(demo, case, words):
    """Reproducer (b) of issue 19: after an earlier turn about a cow, the saliency comes from the dog
    question (the slow reference on the dog question's positions, found without the adapter), not from
    the cow's; with text before the image, from the question's tokens after it."""
    model, processor = demo
    inputs = demo_inputs(processor, [case])
    tok, ids = processor.tokenizer, inputs["input_ids"][0]
    before = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})  # as the reference's pass: the same hidden states
    try:
        with vlmfix.attach(model, processor, vlmfix.GIFT()) as fixed:
            with torch.no_grad():
                model(**inputs)
            state, runtime = fixed.last_state, fixed.runtimes[0]
    finally:
        model.set_attn_implementation({"text_config": before})
    record = state.record(vlmfix.GIFT)
    question = state.rows[0].query_positions.tolist()
    dog = last_occurrence(ids, tok, words)
    assert question[-len(dog):] == dog and record.note(0) == ""
    flags = record.rows[0].informative.tolist()

    def reference(positions: list[int]) -> torch.Tensor:
        informative = [flags[question.index(p)] if p in question else True for p in positions]
        return saliency(model, inputs, [positions], [informative], runtime.saliency_layers, runtime.alpha)[0][0]

    ours = vlmfix.GIFT.saliency(state, 0)
    assert torch.allclose(ours, reference(dog), atol=1e-5, rtol=0)
    if case == "earlier turn":
        cow = last_occurrence(ids, tok, DEMO["first"])
        assert not torch.allclose(ours, reference(cow), atol=1e-3), "the cow question gives another map"


def test_gift_last_turn_without_text_leaves_the_row_unchanged(demo):
    model, processor = demo
    inputs = demo_inputs(processor, ["no text"])
    plain = generate(model, inputs)
    with vlmfix.attach(model, processor, vlmfix.GIFT()) as fixed:
        got = generate(fixed, inputs)
        note = fixed.last_state.record(vlmfix.GIFT).note(0)
    assert note.startswith("the last user turn holds no text")
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
