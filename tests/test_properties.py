"""A randomized hunt for silent wrong results (issue 19): over family x method set x padding side x
where the image stands in the turn x number of turns x batch composition (rows with and without an
image), a forward over the batch must give

- each row what the row gives alone (its logits at its last real token),
- the question exactly the last user turn's text (`RowLayout.query_pieces`),
- no NaN or inf,
- with no methods attached, exactly the model's logits.

Seeded (hypothesis, derandomized): the default run tries `VLMFIX_PROPERTY_EXAMPLES` cases (50), and
`.ci/run` sets more for CI's spare time. A failure prints the smallest case hypothesis found.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch
from families import MODULES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_padding import forward
from tiny import FAMILIES as TINY, IM_END, IM_START, encode, make_batch, make_model, right_pad, tokenizer

import vlmfix

EXAMPLES = int(os.environ.get("VLMFIX_PROPERTY_EXAMPLES", "50"))
FAMILY_NAMES = (*TINY, *MODULES)
SIZES = ((56, 84), (84, 56))
QUESTIONS = (" Is there a red cat in the picture?", " What colour is the sky?", " Is the dog on the road?")
#: the question split around the image ("between")
SPLIT = ((" Is there a red cat", " in the picture?"), (" What colour", " is the sky?"), (" Is the dog", " on the road?"))
EARLIER = " Is there a bird?"
ANSWER = " No."
VAR_TINY = dict(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3))  # with sink dims 0, 1: VAR acts on the tiny models
GIFT_TINY = dict(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))
KINDS = ("var", "gift", "fastv", "staged")


@lru_cache(maxsize=None)
def model_of(family: str) -> torch.nn.Module:
    return make_model(family) if family in TINY else importlib.import_module(f"families.{family}").make_model()


def batch_of(family: str, model, prompts: list) -> dict:
    if family in TINY:
        return make_batch(family, model, prompts)
    return importlib.import_module(f"families.{family}").make_batch(model, prompts)


def in_place_ok(family: str) -> bool:
    return family in TINY or importlib.import_module(f"families.{family}").PRUNE_IN_PLACE


def methods_of(kinds: tuple[str, ...], form: str) -> list:
    made = {"var": lambda: vlmfix.VAR(**VAR_TINY), "gift": lambda: vlmfix.GIFT(**GIFT_TINY),
            "fastv": lambda: vlmfix.FastVPrune(layer=2, keep=4, form=form),
            "staged": lambda: vlmfix.StagedPrune(layers=(2, 3), keep_ratios=(0.6, 0.3), form=form)}
    return [made[k]() for k in kinds]


def turn(content_before: list[int], content_after: list[int]) -> tuple[list[int], list[int]]:
    """A user turn's ids before and after where the image goes (ChatML markers of the tiny tokenizer)."""
    return [IM_START, *encode("user\n"), *content_before], [*content_after, IM_END, *encode("\nassistant\n")]


@st.composite
def rows(draw, image: bool | None = None) -> tuple[tuple[list[int], tuple[int, int] | None, list[int]], str]:
    """One prompt (ids before the image, image size or None, ids after) and its expected question; `image`:
    whether it has one (None: drawn)."""
    q = draw(st.integers(0, len(QUESTIONS) - 1))
    where = draw(st.sampled_from(("after", "before", "between")))
    image = draw(st.booleans()) if image is None else image
    turns = draw(st.integers(1, 2))
    split = {"after": ("", QUESTIONS[q]), "before": (QUESTIONS[q], ""), "between": SPLIT[q]}[where]
    if turns == 1:
        before, after = turn(encode(split[0]), encode(split[1]))
    else:  # the image (at `where` around an earlier question) in the first turn, the question alone in the last
        early = {"after": ("", EARLIER), "before": (EARLIER, ""), "between": (" Is there", " a bird?")}[where]
        before, first_after = turn(encode(early[0]), encode(early[1]))
        last_before, last_after = turn(encode(QUESTIONS[q]), [])
        after = [*first_after, *encode(ANSWER), IM_END, *encode("\n"), *last_before, *last_after]
    before = [1, *before]
    if not image:
        return (before + after, None, []), QUESTIONS[q]
    return (before, draw(st.sampled_from(SIZES)), after), QUESTIONS[q]


@st.composite
def cases(draw):
    family = draw(st.sampled_from(FAMILY_NAMES))
    kinds = tuple(k for k in KINDS if draw(st.booleans()))
    if "fastv" in kinds and "staged" in kinds:  # one pruner per attach
        drop = draw(st.sampled_from(("fastv", "staged")))
        kinds = tuple(k for k in kinds if k != drop)
    form = draw(st.sampled_from(("inplace", "mask"))) if in_place_ok(family) else "mask"
    others = draw(st.lists(rows(), max_size=2))  # one row at least has an image (the families' forwards need one)
    prompts = others[:]
    prompts.insert(draw(st.integers(0, len(others))), draw(rows(image=True)))
    side = draw(st.sampled_from(("left", "right")))
    return family, kinds, form, prompts, side


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_no_silent_wrong_result(case):
    family, kinds, form, prompts, side = case
    model = model_of(family)
    items = [p for p, _ in prompts]
    batch = batch_of(family, model, items)
    if side == "right":
        batch = right_pad(batch)
    attach_kw = {"sink_dims": [0, 1]} if "var" in kinds else {}
    with vlmfix.attach(model, tokenizer(), methods_of(kinds, form), **attach_kw) as fixed:
        got, state = forward(fixed, batch)
        alone = [forward(fixed, batch_of(family, model, [p]))[0][0] for p in items]
    assert torch.isfinite(got).all(), f"{family} {kinds}: NaN or inf in the logits"
    for b, ((_, size, _), question) in enumerate(prompts):
        assert torch.allclose(got[b], alone[b], atol=2e-4, rtol=0), \
            f"{family} {kinds} {form} {side}: row {b} differs from the row alone by {(got[b] - alone[b]).abs().max()}"
        pieces = state.rows[b].query_pieces
        assert pieces is not None and "".join(pieces) == question, \
            f"{family}: row {b}'s question is {pieces!r}, the last user turn asks {question!r}"
    if not kinds:
        with torch.no_grad():
            plain = model(**batch).logits
            attached = vlmfix.attach(model, tokenizer())
            try:
                same = attached(**batch).logits
            finally:
                attached.detach()
        assert torch.equal(plain, same), f"{family}: attach with no methods changed the logits"
