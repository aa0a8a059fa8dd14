"""The vision side (ReadsVision, EditsFeatures) and token merging at decoder layer 0, with a toy method defined
here: keep each image's top-k tokens by the tower attention they receive, merge every dropped token into the
kept token with the most similar key (the kept token's features become its group's mean), and remove the
dropped tokens in place before the decoder."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from tiny import make_batch, make_model

import vlmfix
import vlmfix.core.state
from vlmfix.core.moves import InPlaceMoves, slot_stage
from vlmfix.core.protocol import EditsFeatures, ReadsVision
from vlmfix.methods import registry
from vlmfix.methods.base import MethodCall, Record, Runtime


@dataclass
class ToyMerge(vlmfix.MethodConfig):
    """Keep `keep` image tokens per image; merge the others (a toy)."""

    keep: int = 8


class ToyMergeRecord(Record):
    acts: ClassVar[str] = "merged image tokens"

    def __init__(self, rows: int):
        self.rows = rows
        self.images: list = []  # VisionImage as read
        self.owner_offsets: dict[int, torch.Tensor] = {}  # image -> (N,) kept offset each token belongs to
        self.features_in: dict[int, torch.Tensor] = {}
        self.features_out: dict[int, torch.Tensor] = {}

    def acted(self) -> list[bool]:
        return [any(i.row == r and bool((o != torch.arange(len(o))).any()) for i, o in
                    zip(self.images, self.owner_offsets.values())) for r in range(self.rows)]


class ToyMergeCall(MethodCall, ReadsVision, EditsFeatures, InPlaceMoves):
    record_type = ToyMergeRecord

    def __init__(self, runtime: "ToyMergeRuntime", state):
        super().__init__(runtime, ToyMergeRecord(state.batch_size))
        self.keep = runtime.config.keep

    def read_vision(self, state, images) -> None:
        rec = self.record
        owner = torch.full((state.batch_size, state.prompt_len), -1, dtype=torch.long)
        alive = torch.ones(state.batch_size, state.prompt_len, dtype=torch.bool)
        for img in images:
            rec.images.append(img)
            n = len(img.positions)
            received = img.pooled(img.mean_attention.sum(0))  # (N,) attention each token's patches receive
            keys = img.pooled(img.keys.transpose(0, 1).flatten(1))  # (N, H * d)
            k = min(self.keep, n)
            kept = torch.topk(received, k).indices.sort().values
            keys = torch.nn.functional.normalize(keys, dim=-1)
            offsets = kept[(keys @ keys[kept].T).argmax(1)]
            offsets[kept] = kept
            rec.owner_offsets[img.index] = offsets
            dropped = (offsets != torch.arange(n)).nonzero().flatten()
            owner[img.row, img.positions[dropped]] = img.positions[offsets[dropped]]
            alive[img.row, img.positions[dropped]] = False
        if not bool(alive.all()):
            state.slot_maps.append(slot_stage(0, None, alive, owner))

    def edit_features(self, state, image, features):
        offsets = self.record.owner_offsets[image.index]
        if bool((offsets == torch.arange(len(offsets))).all()):
            return None
        summed = torch.zeros_like(features).index_add_(0, offsets.to(features.device), features)
        count = torch.bincount(offsets, minlength=len(offsets)).clamp_min(1).to(features)
        merged = torch.where((offsets == torch.arange(len(offsets)))[:, None].to(features.device),
                             summed / count[:, None], features)
        self.record.features_in[image.index] = features.detach().clone()
        self.record.features_out[image.index] = merged.detach().clone()
        return merged


class ToyMergeRuntime(Runtime):
    call = ToyMergeCall
    vision_layer = -1  # the tower's last layer

    def start(self, state):
        return ToyMergeCall(self, state)

    def moved_layers(self):
        return tuple(range(self.target.adapter.num_layers))


@pytest.fixture(autouse=True)
def toy():
    entry = vlmfix.register_method(name="toy_merge", config=ToyMerge, runtime=ToyMergeRuntime,
                                   summary="a toy: top-k image tokens by tower attention, the rest merged")
    yield entry
    registry.unregister_method("toy_merge")


def eager_tower(model):
    """The model's vision tower, copied, on eager attention (attention weights returned)."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.config._attn_implementation = "eager"
    return tower


def last_logits(logits, state):
    """(B, V): each row's logits at its last real token (the slot holding it after in-place pruning)."""
    m = state.slot_maps[-1] if state.slot_maps else None
    out = []
    for r in state.rows:
        slot = r.last if m is None else int((m.pos[r.index] == r.last).nonzero()[0, 0])
        out.append(logits[r.index, slot])
    return torch.stack(out)


PROMPTS = [([1, 5, 6], (30, 30), [7, 8, 9, 10, 11]), ([1, 12, 13, 14], None, [15, 16, 17, 18, 19, 20, 21, 22])]


@torch.no_grad()
def test_tower_attention_equals_the_eager_reference():
    model = make_model("llava")
    batch = make_batch("llava", model, [PROMPTS[0], ([1, 12], (40, 70), [13, 14, 15])])
    with vlmfix.attach(model, None, ToyMerge(keep=25)) as fixed:
        fixed(**batch)
        rec = fixed.last_state.record(ToyMerge)
    ref = eager_tower(model)(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    assert [(i.row, i.image_index, i.layer) for i in rec.images] == [(0, 0, 1), (1, 0, 1)]
    got = torch.stack([i.attention for i in rec.images])
    assert got.shape == ref.attentions[-1].shape == (2, 2, 26, 26)
    torch.testing.assert_close(got, ref.attentions[-1].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack([i.hidden for i in rec.images]), ref.hidden_states[-1], atol=1e-5, rtol=0)
    assert rec.images[0].token_map.tolist() == [-1, *range(25)], "CLIP's CLS feeds no token (default strategy)"
    assert fixed.last_state.slot_maps == [], "k = all patches merges nothing"


@torch.no_grad()
def test_keeping_every_patch_is_the_plain_model():
    model = make_model("llava")
    batch = make_batch("llava", model, PROMPTS)
    plain = model(**batch).logits
    gen = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    plain_gen = model.generate(**batch, **gen)
    with vlmfix.attach(model, None, ToyMerge(keep=25)) as fixed:
        assert torch.equal(fixed(**batch).logits, plain)
        ours = fixed.generate(**batch, **gen)
    assert torch.equal(ours.sequences, plain_gen.sequences)
    assert torch.equal(torch.stack(ours.logits), torch.stack(plain_gen.logits))


@torch.no_grad()
def test_merges_are_recorded_and_merged_features_are_group_means():
    model = make_model("llava")
    batch = make_batch("llava", model, PROMPTS)
    projected = model.model.get_image_features(batch["pixel_values"], vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output[0]
    entering = {}

    def keep(mod, args, kw):  # registered before attach: sees layer 0's input before the toy's gather
        entering.setdefault("h", (args[0] if args else kw["hidden_states"]).clone())

    hook = model.model.language_model.layers[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with vlmfix.attach(model, None, ToyMerge(keep=6)) as fixed:
            fixed(**batch)
            state = fixed.last_state
    finally:
        hook.remove()
    rec = state.record(ToyMerge)
    assert rec.acted() == [True, False]
    (m,) = state.slot_maps
    row = state.rows[0]
    assert m.layer == 0 and int(m.valid[0].sum()) == state.prompt_len - 25 + 6
    owner = state.merged_into(0)
    assert torch.equal(owner, m.owner) and bool((owner[1] == -1).all())
    offsets = rec.owner_offsets[0]
    kept = offsets.unique()
    assert len(kept) == 6 and bool(m.alive[0, row.image_positions[kept]].all())
    assert int(m.alive[0, row.image_positions].sum()) == 6
    call = next(c for c in state.calls if isinstance(c, ToyMergeCall))
    view = call.view(vlmfix.core.state.Block(1, state.phase, 0, m.pos.shape[1], m.pos.shape[1]), state)
    assert view.owner is m.owner, "the SlotView of a moved layer reports the merges too"
    total = 0
    for j in kept.tolist():
        members = (offsets == j).nonzero().flatten()
        group = m.group(0, int(row.image_positions[j]))
        assert torch.equal(group, row.image_positions[members])
        total += len(members)
        mean = projected[members].mean(0)  # the hand check: the mean of the group's projected features
        torch.testing.assert_close(rec.features_out[0][j], mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(entering["h"][0, row.image_positions[j]], mean, atol=1e-6, rtol=1e-5)
    assert total == 25, "every image token belongs to one kept token's group"
    torch.testing.assert_close(rec.features_in[0], projected, atol=1e-6, rtol=1e-5)


#: the image row left-padded (a long text-only row beside it)
PADDED_IMAGE = [([1, 5, 6], (30, 30), [7, 8]), ([1, *range(12, 50)], None, [50, 51])]


@pytest.mark.parametrize("prompts", [PROMPTS, PADDED_IMAGE], ids=["text_row_padded", "image_row_padded"])
@torch.no_grad()
def test_batch_gives_each_row_what_it_gives_alone(prompts):
    model = make_model("llava")
    batch = make_batch("llava", model, prompts)
    gen = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with vlmfix.attach(model, None, ToyMerge(keep=5)) as fixed:
        out = fixed(**batch)
        state = fixed.last_state
        together = last_logits(out.logits, state)
        m = state.slot_maps[0]
        assert out.logits.shape[1] == m.pos.shape[1]
        assert m.valid.sum(1).tolist() == [batch["input_ids"].shape[1] - 20, batch["input_ids"].shape[1]]
        generated = fixed.generate(**batch, **gen)
        for r, prompt in enumerate(prompts):
            alone_batch = make_batch("llava", model, [prompt])
            alone = last_logits(fixed(**alone_batch).logits, fixed.last_state)
            torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=0)
            alone_gen = fixed.generate(**alone_batch, **gen)
            torch.testing.assert_close(generated.logits[0][r], alone_gen.logits[0][0], atol=1e-5, rtol=0)
            new = alone_gen.sequences[0, alone_batch["input_ids"].shape[1]:]
            assert torch.equal(generated.sequences[r, batch["input_ids"].shape[1]:][:len(new)], new)
    # generate encodes the images before its prefill: its first step must see the same edited features
    torch.testing.assert_close(generated.logits[0], together, atol=1e-5, rtol=0)
    plain = model(**batch).logits[0, -1]
    assert (together[0] - plain).abs().max() > 1e-4, "merging must change the image row"


def test_unsupported_families_are_refused_at_attach():
    model = make_model("qwen2_vl")
    with pytest.raises(ValueError, match="Supported families: LLaVA-1.5, Gemma 3"):
        vlmfix.attach(model, None, ToyMerge())
    assert getattr(model.model.language_model.layers[0].self_attn, "_vlmfix", None) is None


# -- Gemma 3: SigLIP's 8 x 8 patches pooled 2 x 2 into 4 x 4 tokens ------------------------------------
@torch.no_grad()
def test_gemma3_tower_pooling_and_merging():
    gemma3 = pytest.importorskip("families.gemma3")
    model = gemma3.make_model()
    prompts = [([1, 5, 6], (32, 32), [7, 8, 9]), ([1, 12, 13], None, [14, 15, 16, 17, 18, 19, 20])]
    batch = gemma3.make_batch(model, prompts)
    plain = model(**batch).logits
    with vlmfix.attach(model, None, ToyMerge(keep=16)) as fixed:
        assert torch.equal(fixed(**batch).logits, plain)
        rec = fixed.last_state.record(ToyMerge)
    (img,) = rec.images
    ref = eager_tower(model)(batch["pixel_values"], output_attentions=True)
    torch.testing.assert_close(img.attention, ref.attentions[-1][0].float(), atol=1e-5, rtol=0)
    expect = (torch.arange(8)[:, None] // 2 * 4 + torch.arange(8)[None, :] // 2).flatten()
    assert torch.equal(img.token_map, expect)
    with vlmfix.attach(model, None, ToyMerge(keep=5)) as fixed:
        together = last_logits(fixed(**batch).logits, fixed.last_state)
        assert len(rec.owner_offsets) == 1
        rec = fixed.last_state.record(ToyMerge)
        assert len(rec.owner_offsets[0].unique()) == 5
        for r, prompt in enumerate(prompts):
            alone = last_logits(fixed(**gemma3.make_batch(model, [prompt])).logits, fixed.last_state)
            torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_tower_hooks_live_only_while_the_tower_runs():
    model = make_model("llava")
    tower, layer = model.model.vision_tower, model.model.vision_tower.encoder.layers[-1]
    batch = make_batch("llava", model, PROMPTS)
    with vlmfix.attach(model, None, []):
        assert not tower._forward_pre_hooks, "no vision-side call: no tower hook"
    with vlmfix.attach(model, None, ToyMerge(keep=5)) as fixed:
        assert len(tower._forward_pre_hooks) == 1 and not layer.self_attn.q_proj._forward_hooks
        model.model.get_image_features(batch["pixel_values"], vision_feature_layer=-1,
                                       vision_feature_select_strategy="default")  # an encoding no prefill follows
        assert not layer.self_attn.q_proj._forward_hooks and not model.model.multi_modal_projector._forward_hooks
        text = make_batch("llava", model, [PROMPTS[1]])
        fixed(**text)
        assert fixed.last_state.record(ToyMerge).images == [], "the stale capture is not handed to the next call"
        fixed(**batch)
        assert len(fixed.last_state.record(ToyMerge).images) == 1
    assert not tower._forward_pre_hooks


def test_merged_into_follows_merges_through_stages():
    from vlmfix.core.state import CallState

    state = CallState(rows=[], prompt_len=6)
    state.rows = [None]  # batch_size 1 (the rows' layouts are not read here)
    first = torch.tensor([[-1, 0, -1, -1, 3, -1]])  # 1 -> 0, 4 -> 3 at layer 0
    alive0 = first < 0
    state.slot_maps.append(slot_stage(0, None, alive0, first))
    second = torch.tensor([[-1, -1, -1, 0, -1, -1]])  # 3 -> 0 at layer 2
    state.slot_maps.append(slot_stage(2, state.slot_maps[0], alive0 & (second < 0), second))
    assert state.merged_into(1).tolist() == first.tolist()
    assert state.merged_into(2).tolist() == [[-1, 0, -1, 0, 0, -1]]
    assert state.slot_maps[1].pos.tolist() == [[0, 2, 5]]
    assert state.slot_maps[0].group(0, 3).tolist() == [3, 4] and state.slot_maps[1].group(0, 0).tolist() == [0, 3]
