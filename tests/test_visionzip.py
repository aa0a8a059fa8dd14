"""VisionZip (vlmfix.methods.visionzip) against the slow reference (tests/reference_visionzip.py): dominant and
contextual tokens and merged features on LLaVA-1.5 (CLS attention) and Gemma 3 (mean attention received), the
pruned model's logits against the language model fed only the kept / merged features, keep-all is the plain
model, batch rows are rows alone, composition, refusals, CLI."""

from __future__ import annotations

import pytest
import torch
from reference_divprune import kept_model_logits, layer0_inputs
from reference_visionzip import gemma3_visionzip, llava_visionzip
from tiny import PAD, make_batch, make_model, tokenizer

import vlmfix
from vlmfix.methods.prune import kept_tokens
from vlmfix.methods.visionzip import VisionZip
from probes import assert_forms_agree_and_mask_compiles, assert_pruned_tokens_are_never_sinks, lmms_eval_logs

torch.set_num_threads(2)
GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
ONE = [([1, 5, 6], (60, 90), [7, 8, 9, 10, 11])]
TWO = [([1, 5, 6], (60, 90), [7, 8, 9, 10, 11]), ([1, 12, 13], (90, 60), [14, 15, 16])]


@pytest.fixture(scope="module")
def llava():
    return make_model("llava")


def last_logits(logits, state):
    m = state.slot_maps[-1] if state.slot_maps else None
    out = []
    for r in state.rows:
        slot = r.last if m is None else int((m.pos[r.index] == r.last).nonzero()[0, 0])
        out.append(logits[r.index, slot])
    return torch.stack(out)


@pytest.mark.parametrize("keep,contextual", [(8, 2), (10, 0), (3, 1), (20, 5)])
@torch.no_grad()
def test_llava_equals_the_reference(llava, keep, contextual):
    """Dominant tokens, targets, groups and merged features as the paper's, and the pruned model's logits equal the
    language model fed only the kept features (the contextual ones merged) at their positions."""
    batch = make_batch("llava", llava, ONE)
    dominant, targets, groups, features = llava_visionzip(llava, batch["pixel_values"], keep, contextual)
    embeds = layer0_inputs(llava, batch)
    with vlmfix.attach(llava, None, VisionZip(keep=keep, contextual=contextual / keep)) as fixed:
        logits = fixed(**batch).logits[0]
        state = fixed.last_state
    rec = state.record(VisionZip)
    img = state.rows[0].image_positions
    assert rec.dominant[0].tolist() == img[dominant].tolist()
    assert rec.contextual[0].tolist() == img[targets].tolist()
    assert kept_tokens(state).tolist() == sorted(img[dominant + targets].tolist())
    for t, members in groups.items():
        assert state.slot_maps[0].group(0, int(img[t])).tolist() == sorted(img[members].tolist())
    assert rec.row(0) == {"kept": keep, "dominant": keep - contextual, "contextual": contextual,
                          "merged": sum(len(m) - 1 for m in groups.values())}
    embeds[0, img] = features  # the plain model's inputs with the contextual tokens' features merged
    kept = state.slot_maps[0].pos[0]
    torch.testing.assert_close(logits, kept_model_logits(llava, embeds, kept), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_all_is_the_plain_model(llava):
    batch = make_batch("llava", llava, TWO)
    plain = llava(**batch).logits
    plain_gen = llava.generate(**batch, **GEN)
    with vlmfix.attach(llava, None, VisionZip(keep=25)) as fixed:
        assert torch.equal(fixed(**batch).logits, plain)
        ours = fixed.generate(**batch, **GEN)
        rec = fixed.last_state.record(VisionZip)
    assert torch.equal(ours.sequences, plain_gen.sequences)
    assert torch.equal(torch.stack(ours.logits), torch.stack(plain_gen.logits))
    assert rec.acted() == [False, False] and not fixed.last_state.slot_maps
    assert rec.notes(1)[0].startswith("row 1: keep 25 >= the 25 visual tokens of image 0, so nothing is pruned")


@torch.no_grad()
def test_batch_rows_equal_rows_alone(llava):
    prompts = [([1, 5, 6], (60, 90), [7, 8]), ([1, *range(12, 40)], None, [40, 41]), ([1, 12], (90, 60), [13, 14, 15])]
    batch = make_batch("llava", llava, prompts)
    with vlmfix.attach(llava, None, VisionZip(keep_ratio=0.3)) as fixed:
        together = last_logits(fixed(**batch).logits, fixed.last_state)
        rec = fixed.last_state.record(VisionZip)
        assert rec.acted() == [True, False, True] and rec.row(0)["contextual"] == 1  # round(8 x 10 / 64)
        gen = fixed.generate(**batch, **GEN)
        for r, prompt in enumerate(prompts):
            alone_batch = make_batch("llava", llava, [prompt])
            alone = last_logits(fixed(**alone_batch).logits, fixed.last_state)
            torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=0)
            alone_gen = fixed.generate(**alone_batch, **GEN)
            new = alone_gen.sequences[0, alone_batch["input_ids"].shape[1]:]
            assert torch.equal(gen.sequences[r, batch["input_ids"].shape[1]:], new)
            torch.testing.assert_close(gen.logits[-1][r], alone_gen.logits[-1][0], atol=1e-4, rtol=0)
    # generate encodes the images before its prefill: its first step sees the same merged features
    torch.testing.assert_close(gen.logits[0], together, atol=1e-5, rtol=0)


@torch.no_grad()
def test_gemma3_mean_attention_received_and_rows_alone():
    gemma3 = pytest.importorskip("families.gemma3")
    model = gemma3.make_model()
    prompts = [([1, 5, 6], (32, 32), [7, 8, 9]), ([1, 12, 13], None, [14, 15, 16, 17, 18, 19, 20])]
    batch = gemma3.make_batch(model, prompts)
    plain = model(**batch).logits
    with vlmfix.attach(model, None, VisionZip(keep=16)) as fixed:
        assert torch.equal(fixed(**batch).logits, plain)
    dominant, targets, groups, features = gemma3_visionzip(model, batch["pixel_values"], 6, 2, gemma3.SIDE)
    with vlmfix.attach(model, None, VisionZip(keep=6, contextual=2 / 6)) as fixed:
        assert fixed.runtimes[0].cls is False
        together = last_logits(fixed(**batch).logits, fixed.last_state)
        state = fixed.last_state
        rec = state.record(VisionZip)
        img = state.rows[0].image_positions
        assert rec.dominant[0].tolist() == img[dominant].tolist()
        assert rec.contextual[0].tolist() == img[targets].tolist()
        for t, members in groups.items():
            assert state.slot_maps[0].group(0, int(img[t])).tolist() == sorted(img[members].tolist())
        for r, prompt in enumerate(prompts):
            alone = last_logits(fixed(**gemma3.make_batch(model, [prompt])).logits, fixed.last_state)
            torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=0)


def test_other_families_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="VisionZip reads the vision tower.*Supported families: LLaVA-1.5, Gemma 3.*"
                                         "DivPrune"):
        vlmfix.attach(make_model("qwen2_vl"), None, VisionZip())


@torch.no_grad()
def test_forms_agree_and_the_mask_form_runs_compiled(llava):
    """The mask form chooses the in-place form's tokens and gives its tokens and logits, and runs under a static
    cache and compiled (`probes.assert_forms_agree_and_mask_compiles`)."""
    assert_forms_agree_and_mask_compiles(llava, lambda form: VisionZip(keep=6, form=form), TWO, GEN)


@torch.no_grad()
def test_composes_with_var_gift_and_pai(llava):
    batch = make_batch("llava", llava, TWO)
    assert_pruned_tokens_are_never_sinks(llava, VisionZip(keep=6), TWO, GEN, dropped=19)
    prepass = vlmfix.GIFT(alpha=3.0, saliency_layers=(2,), boost_layers=(1, 2, 3))  # a pre-pass over the whole prompt
    forms = {}
    for form in ("inplace", "mask"):
        with vlmfix.attach(llava, tokenizer(), [prepass, VisionZip(keep=6, form=form)]) as fixed:
            out = fixed.generate(**batch, **GEN)
            forms[form] = out.sequences, torch.stack(out.logits)
    assert torch.equal(forms["inplace"][0], forms["mask"][0])
    torch.testing.assert_close(forms["inplace"][1], forms["mask"][1], atol=1e-4, rtol=0)
    with vlmfix.attach(llava, None, [vlmfix.PAI(gamma=1.0), VisionZip(keep=6)]) as fixed:
        fixed.generate(**batch, **GEN)
    with pytest.raises(ValueError, match="at most one pruner"):
        vlmfix.attach(llava, None, [VisionZip(keep=6), vlmfix.FastVPrune(keep=4)])


def test_config_checks():
    with pytest.raises(ValueError, match="not both"):
        VisionZip(keep=4, keep_ratio=0.5)
    with pytest.raises(ValueError, match="contextual"):
        VisionZip(contextual=1.5)
    with pytest.raises(ValueError, match="vision_layer"):
        VisionZip(vision_layer="last")
    with pytest.raises(ValueError, match="vision_layer 7 is out of range"):
        vlmfix.attach(make_model("llava"), None, VisionZip(vision_layer=7))
    assert vlmfix.methods.build("visionzip", "keep64") == VisionZip(keep=64, contextual=10 / 64)


def test_cli_generate_writes_the_kept_map(tmp_path, capsys):
    from families.processors import save

    from vlmfix.cli.main import main

    folder = save("llava", tmp_path / "llava")
    assert main(["generate", "--model", str(folder), "--methods", "visionzip:quarter", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "kept_tokens.png").is_file() and "kept_tokens.png" in printed
    assert "visionzip" in printed


def test_lmms_eval_runs_visionzip_and_logs_its_record():
    """lmms-eval's `methods=visionzip:quarter` prunes each request's image on the demo VLM and logs its row."""
    logs = lmms_eval_logs("visionzip:quarter", max_new_tokens=2)
    assert [log["visionzip_kept"] for log in logs] == [36, 36]
