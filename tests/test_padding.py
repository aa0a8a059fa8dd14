"""Padding, either side (issue 19): each row's real tokens come from the attention mask, so a forward
over a batch padded on the left or on the right gives every method's per-row result (the logits at
the row's last real token, what its record says about the row) as the row run alone; generation,
which needs left padding, refuses a right-padded batch with one error naming padding_side="left"
before any work."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_families import batch_of, case  # noqa: F401 (case: the families' fixture)
from test_families import prompts as family_prompts
from tiny import chat_after, make_batch, make_model, right_pad, tokenizer

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.adapters.base import sides
from vlmfix.core.attach import VlmfixError
from vlmfix.methods.prune import PruneRecord, prune_record

VAR_TINY = dict(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3))  # makes VAR act on the tiny models (see test_var)
GIFT_TINY = dict(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3))
#: what each case attaches (sink dims 0 and 1 for the tiny models' VAR)
METHODS = {
    "var": lambda: [vlmfix.VAR(**VAR_TINY), vlmfix.SinkShare(tau=1.2)],
    "gift": lambda: [vlmfix.GIFT(**GIFT_TINY)],
    "gift-prepass": lambda: [vlmfix.GIFT(alpha=3.0, saliency_layers=(2,), boost_layers=(1, 2, 3))],
    "fastv-mask": lambda: [vlmfix.FastVPrune(layer=2, keep=4, form="mask")],
    "fastv-inplace": lambda: [vlmfix.FastVPrune(layer=2, keep=4, debias=vlmfix.Debias())],
    "staged-inplace": lambda: [vlmfix.StagedPrune(layers=(1, 3), keep_ratios=(0.6, 0.3))],
    "staged-mask": lambda: [vlmfix.StagedPrune(layers=(1, 3), keep_ratios=(0.6, 0.3), form="mask")],
    "var-gift-fastv": lambda: [vlmfix.VAR(**VAR_TINY), vlmfix.GIFT(**GIFT_TINY), vlmfix.FastVPrune(layer=2, keep=4)],
    "var-gift-staged-mask": lambda: [vlmfix.VAR(**VAR_TINY), vlmfix.GIFT(**GIFT_TINY),
                                     vlmfix.StagedPrune(layers=(1, 3), keep_ratios=(0.6, 0.3), form="mask")],
}


def prompts() -> list:
    """Three chat prompts of different lengths (one text-only), the images giving every family >= 24 tokens."""
    return [([1, 5, 6], (112, 168), chat_after()),
            ([1, 12, 13, 14], (168, 112), chat_after(" Is the dog on the road in the picture?")),
            ([1, 20, 21], None, chat_after(" What colour is the sky?"))]


def batches(family: str, model) -> dict:
    """{"left": the left-padded batch, "right": the same padded on the right (rows 0 and 2; row 1 is the
    longest), "alone": each prompt alone}."""
    left = make_batch(family, model, prompts())
    assert (left["attention_mask"][:, 0] == 0).tolist() == [True, False, True]
    return {"left": left, "right": right_pad(left), "alone": [make_batch(family, model, [p]) for p in prompts()]}


def last_real(batch: dict) -> torch.Tensor:
    """(B,): each row's last real token, read from the batch's attention mask."""
    mask = batch["attention_mask"]
    return mask.shape[1] - 1 - mask.flip(1).argmax(1)


def forward(fixed, batch) -> tuple[torch.Tensor, object]:
    """(B, V) each row's logits at its last real token (after in-place pruning, at the slot that holds it),
    and the call's state."""
    with torch.no_grad():
        logits = fixed(**batch).logits
    state, slots = fixed.last_state, last_real(batch)
    if state.slot_maps and state.slot_maps[-1].index is not None:
        slots = (state.slot_maps[-1].pos == slots[:, None]).int().argmax(1)
    return logits[torch.arange(len(slots)), slots], state


def row_records(state, row: int) -> dict:
    """What the call's records say about batch row `row`, in positions relative to its first real token."""
    first = state.rows[row].pad_left
    layout = state.rows[row]
    out = {"image": (layout.image_positions - first).tolist(),
           "question": None if layout.query_positions is None else (layout.query_positions - first).tolist()}
    if not layout.has_image:  # methods leave it alone (alone, a pruner or probe may not even run)
        return out
    if state.has_record(vlmfix.GIFT):
        rec = state.record(vlmfix.GIFT)
        out["gift"] = (rec.note(row), rec.saliency(row))
    if any(isinstance(rec, PruneRecord) for rec in state.records):
        rec = prune_record(state)
        out["kept"] = [(stage.kept[row] - first).tolist() for stage in rec.stages]
        out["budgets"] = [stage.budget[row] for stage in rec.stages]
        out["scores"] = [stage.scores[row] for stage in rec.stages]
    if state.has_record(vlmfix.VAR):
        out["var"] = {layer: (v["visual_sinks"][row], v["image_centric"][row], v["moved"][row])
                      for layer, v in vlmfix.VAR.summary(state).items()}
        out["sinks"] = {layer: (state.sinks(layer, row) - first).tolist() for layer in (2, 3)}
    if state.has_record(vlmfix.SinkShare):
        out["share"] = {layer: float(s[row]) for layer, s in state.record(vlmfix.SinkShare).shares.items()}
    return out


def assert_same(ours, alone, where: str) -> None:
    """Records equal: numbers to 1e-4 (a saliency map is min-max normalised: the batch's rounding grows), the
    rest exactly."""
    if isinstance(ours, dict):
        assert ours.keys() == alone.keys(), where
        for key in ours:
            assert_same(ours[key], alone[key], f"{where}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(alone), where
        for k, (a, b) in enumerate(zip(ours, alone)):
            assert_same(a, b, f"{where}[{k}]")
    elif isinstance(ours, torch.Tensor):
        assert alone is not None, where
        ours, alone = ours.float(), alone.float()
        assert torch.allclose(ours, alone, atol=1e-4, rtol=0, equal_nan=True), f"{where}: {(ours - alone).abs().max()}"
    elif isinstance(ours, float):
        assert ours == pytest.approx(alone, abs=1e-4, nan_ok=True), where
    else:
        assert ours == alone, where


def assert_rows_alone(fixed, batch: dict, singles: list[dict], atol: float = 1e-5,
                      around=lambda rows: contextlib.nullcontext()) -> torch.Tensor:
    """Each row of `batch` gives, at its last real token, the logits (to `atol`) and the records of its prompt
    alone (`singles[b]`); `around(rows)`: a context for a forward over `rows` batch rows. Returns the batch's
    logits there."""
    alone = []
    for single in singles:
        with around(1):
            alone.append(forward(fixed, single))
    with around(len(singles)):
        got, state = forward(fixed, batch)
    padded = "right" if bool((batch["attention_mask"][:, -1] == 0).any()) else "left"
    for b, (logits, single) in enumerate(alone):
        err = (got[b] - logits[0]).abs().max()
        assert err <= atol, f"{padded}-padded row {b}: logits differ from the row alone by {err:.3g}"
        assert_same(row_records(state, b), row_records(single, 0), f"{padded}-padded row {b}")
    return got


@pytest.mark.parametrize("methods", list(METHODS))
def test_padded_rows_equal_the_rows_alone(family, model, methods):
    data = batches(family, model)
    with vlmfix.attach(model, tokenizer(), METHODS[methods](), sink_dims=[0, 1]) as fixed:
        assert_rows_alone(fixed, data["left"], data["alone"])
        got = assert_rows_alone(fixed, data["right"], data["alone"])
    with torch.no_grad():
        plain = model(**data["right"]).logits[torch.arange(3), last_real(data["right"])]
    assert float((plain - got)[:2].abs().max()) > 1e-3, "the methods must act on the image rows"


def test_every_family_right_padded_rows_equal_alone(case):  # noqa: F811 (the fixture)
    """The families of tests/families (images, and videos where the family takes them), VAR, GIFT and FastV
    together (in place where the family allows it)."""
    module, model, kind, _ = case
    items = family_prompts(kind, module)
    before, size, after = items[0]
    items.append((before + [30] * 9, size, after))  # a longer copy of the first: some row is padded
    right = right_pad(batch_of(module.NAME, kind, model, items))
    assert bool((right["attention_mask"][:, -1] == 0).any()), "the batch must be padded on the right"
    form = "inplace" if module.PRUNE_IN_PLACE else "mask"
    methods = [vlmfix.VAR(**VAR_TINY), vlmfix.GIFT(**GIFT_TINY), vlmfix.FastVPrune(layer=2, keep=4, form=form)]
    with vlmfix.attach(model, tokenizer(), methods, sink_dims=[0, 1]) as fixed:
        assert_rows_alone(fixed, right, [batch_of(module.NAME, kind, model, [p]) for p in items])


def test_row_layouts_read_the_padding_from_the_mask(family, model):
    data = batches(family, model)
    adapter = get_adapter(model, tokenizer())
    alone = [adapter.row_layouts(single)[0] for single in data["alone"]]
    width = data["left"]["input_ids"].shape[1]
    for side in ("left", "right"):
        for row, single in zip(adapter.row_layouts(data[side]), alone):
            n = single.prompt_len
            assert (row.pad_left, row.pad_right) == ((width - n, 0) if side == "left" else (0, width - n))
            assert row.last - row.pad_left == n - 1
            shift = row.pad_left
            assert torch.equal(row.image_positions - shift, single.image_positions)
            assert (row.query_positions is None) == (single.query_positions is None)
            if row.query_positions is not None:
                assert torch.equal(row.query_positions - shift, single.query_positions)
                assert row.query_pieces == single.query_pieces
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert sides(mask).tolist() == [[1, 1], [0, 0], [4, 0], [0, 1]]


# -- generate -------------------------------------------------------------------------------------
class Calls:
    """Counts the forwards of a module (a hook, removed on exit)."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self._hook = module.register_forward_pre_hook(self._seen)

    def _seen(self, module, args) -> None:
        self.count += 1

    def __enter__(self) -> "Calls":
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()


@pytest.mark.parametrize("methods", [[], ["gift", "fastv-mask"]], ids=["no-methods", "gift-fastv"])
def test_generate_refuses_right_padding_before_any_work(family, model, methods):
    data = batches(family, model)
    settings = dict(max_new_tokens=2, do_sample=False, pad_token_id=0)
    configs = [m for name in methods for m in METHODS[name]()]
    refused = r'batch rows \[0, 2\] are padded on the right.*padding_side="left"'
    with Calls(model) as forwards, vlmfix.attach(model, tokenizer(), configs) as fixed:
        first = fixed.adapter.decoder_layers[0]
        with Calls(first) as layer, pytest.raises(VlmfixError, match=refused):
            fixed.generate(**data["right"], **settings)
        assert forwards.count == 0 and layer.count == 0, "fixed.generate ran before refusing"
        with Calls(first) as layer, pytest.raises(VlmfixError, match=refused):
            model.generate(**data["right"], **settings)
        assert forwards.count == 1 and layer.count == 0, "the prefill ran its decoder before refusing"
        # the same handle then generates from left-padded and unpadded (equal-length) batches
        fixed.generate(**data["left"], **settings)
        out = model.generate(**make_batch(family, model, [prompts()[1]] * 2), **settings)
        assert torch.equal(out[0], out[1])


def test_a_right_padded_forward_handed_a_cache_is_refused():
    from transformers import DynamicCache

    model = make_model("llava")
    data = batches("llava", model)
    with vlmfix.attach(model, tokenizer(), vlmfix.GIFT(**GIFT_TINY)) as fixed:
        with pytest.raises(VlmfixError, match='padding_side="left"'):
            fixed(**data["right"], past_key_values=DynamicCache())
        fixed(**data["right"])  # a plain forward takes it


# -- the SmolLM2 LLaVA and the demo VLM --------------------------------------------------------------
def smol_batches(processor, images, texts) -> dict:
    """{"right": the prompts right-padded into one batch, "alone": each prompt alone}."""
    right = dict(processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="right"))
    assert bool((right["attention_mask"][:, -1] == 0).any()), "the batch must be padded on the right"
    return {"right": right,
            "alone": [dict(processor(images=i, text=t, return_tensors="pt")) for i, t in zip(images, texts)]}


@pytest.mark.smollm2
@pytest.mark.parametrize("methods", ["gift", "fastv-mask", "fastv-inplace", "staged", "var-gift-fastv"])
def test_smol_llava_right_padded_rows_equal_alone(small_smol_llava, methods):
    from PIL import Image
    from planted import TAU, planted_sinks

    from vlmfix.demo.assemble import prompt_for

    model, processor = small_smol_llava
    images = [Image.new("RGB", (80, 60), "blue"), Image.new("RGB", (50, 90), "green")]
    texts = [prompt_for("Is there a red bicycle near the tree?"), prompt_for("Describe this picture in detail.")]
    data = smol_batches(processor, images, texts)
    make = {
        "gift": lambda: [vlmfix.GIFT()],
        "fastv-mask": lambda: [vlmfix.FastVPrune(keep=32, form="mask")],
        "fastv-inplace": lambda: [vlmfix.FastVPrune(keep=32, debias=vlmfix.Debias())],
        "staged": lambda: [vlmfix.StagedPrune(layers=(2, 10, 20), keep_ratios=(0.5, 0.25, 0.1))],
        "var-gift-fastv": lambda: [vlmfix.VAR(tau=TAU), vlmfix.GIFT(), vlmfix.FastVPrune(keep=32, form="mask")],
    }[methods]

    def around(rows: int):
        """Visual sinks at the same image tokens of every row (a row alone is row 0) when VAR is attached."""
        if not methods.startswith("var"):
            return contextlib.nullcontext()
        return planted_sinks(model, processor.tokenizer, {b: [0, 5, 70, 140] for b in range(rows)})

    with vlmfix.attach(model, processor, make()) as fixed:
        assert_rows_alone(fixed, data["right"], data["alone"], 1e-4, around)


@pytest.fixture(scope="module")
def demo():
    return vlmfix.load_demo()


def test_demo_right_padded_rows_equal_alone_and_generate_refuses(demo):
    """The demo's processor pads on the right by default (the issue's case: GIFT and FastV off by 6.5 and 0.12)."""
    from PIL import Image

    from vlmfix.demo.assemble import prompt_for

    model, processor = demo
    images = [Image.new("RGB", (80, 60), "blue"), Image.new("RGB", (50, 90), "green")]
    texts = [prompt_for("Is there a dog?"),
             prompt_for("Describe this picture in detail: every object, its colour and place.")]
    default = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert bool((default["attention_mask"][:, -1] == 0).any()), "the demo processor pads on the right"
    data = smol_batches(processor, images, texts)
    for methods in ([vlmfix.GIFT()], [vlmfix.FastVPrune(keep=32, form="mask")]):
        with vlmfix.attach(model, processor, methods) as fixed:
            assert_rows_alone(fixed, data["right"], data["alone"], 1e-4)
            with pytest.raises(VlmfixError, match='padding_side="left"'):
                fixed.generate(**default, max_new_tokens=2)
