"""DivPrune (vlmfix.methods.divprune) against the slow reference (tests/reference_divprune.py): the max-min
selection on hand-sized features, the pruned model's logits against the language model fed only the kept
tokens, keep-all is the plain model, batch rows are rows alone, composition, refusals, CLI and lmms-eval."""

from __future__ import annotations

import pytest
import torch
from reference_divprune import divprune_select, kept_model_logits, layer0_inputs
from test_families import case  # noqa: F401 (the families' fixture)
from tiny import PAD, make_batch, make_model, tokenizer

import vlmfix
from vlmfix.adapters import get_adapter
from vlmfix.methods.divprune import DivPrune, max_min_select
from vlmfix.methods.prune import kept_tokens
from probes import assert_forms_agree_and_mask_compiles, assert_pruned_tokens_are_never_sinks, lmms_eval_logs

torch.set_num_threads(2)
GEN = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
ONE = [([1, 5, 6], (60, 90), [7, 8, 9, 10, 11])]
TWO = [([1, 5, 6], (60, 90), [7, 8, 9, 10, 11]), ([1, 12, 13], (90, 60), [14, 15, 16])]


def last_logits(logits, state):
    """(B, V): each row's logits at its last real token (in the slot holding it after the pruning)."""
    m = state.slot_maps[-1] if state.slot_maps else None
    out = []
    for r in state.rows:
        slot = r.last if m is None else int((m.pos[r.index] == r.last).nonzero()[0, 0])
        out.append(logits[r.index, slot])
    return torch.stack(out)


@pytest.mark.parametrize("n,d,k", [(12, 5, 4), (30, 8, 9), (40, 3, 1), (7, 4, 7)])
def test_selection_equals_the_papers_greedy(n, d, k):
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 100 + k))
    picked, gaps = max_min_select(features, k)
    assert picked.tolist() == divprune_select(features, k)
    assert bool((gaps[2:] <= gaps[1:-1] + 1e-6).all()), "each next token is at most as far from those kept before"


def test_duplicates_are_kept_once():
    base = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    features = torch.cat([base, base[:2], base[:2]])  # 9 tokens, 5 distinct
    picked, _ = max_min_select(features, 5)
    assert sorted(features[picked].unique(dim=0).shape[:1]) == [5], "max-min keeps every distinct token first"
    assert picked.tolist() == divprune_select(features, 5)


@torch.no_grad()
def test_pruned_model_equals_the_model_fed_only_the_kept_tokens(family_model):
    family, model = family_model
    batch = make_batch(family, model, ONE)
    embeds = layer0_inputs(model, batch)
    with vlmfix.attach(model, None, DivPrune(keep=5)) as fixed:
        logits = fixed(**batch).logits[0]
        state = fixed.last_state
    row = state.rows[0]
    img = row.image_positions
    expect = img[torch.tensor(divprune_select(embeds[0, img], 5))].sort().values
    assert kept_tokens(state).tolist() == expect.tolist()
    assert state.record(DivPrune).row(0) == {"kept": 5}
    if family == "qwen2_vl":  # 3-D rotary positions: the selection is checked, the logits against the batch below
        return
    kept = state.slot_maps[0].pos[0]
    assert len(kept) == batch["input_ids"].shape[1] - len(img) + 5
    torch.testing.assert_close(logits, kept_model_logits(model, embeds, kept), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_all_is_the_plain_model():
    model = make_model("llava")
    batch = make_batch("llava", model, TWO)
    plain = model(**batch).logits
    plain_gen = model.generate(**batch, **GEN)
    with vlmfix.attach(model, None, DivPrune(keep=25)) as fixed:
        assert torch.equal(fixed(**batch).logits, plain)
        ours = fixed.generate(**batch, **GEN)
        rec = fixed.last_state.record(DivPrune)
    assert torch.equal(ours.sequences, plain_gen.sequences)
    assert torch.equal(torch.stack(ours.logits), torch.stack(plain_gen.logits))
    assert rec.acted() == [False, False] and not fixed.last_state.slot_maps
    assert rec.notes(0) == ["row 0: keep 25 >= the 25 visual tokens of its image(s), so nothing is pruned there "
                            "(keep counts are sized for LLaVA-1.5's 576 tokens; keep_ratio scales with the image)"]


@torch.no_grad()
def test_batch_rows_equal_rows_alone(family_model):
    family, model = family_model
    prompts = [([1, 5, 6], (60, 90), [7, 8]), ([1, *range(12, 40)], None, [40, 41]), ([1, 12], (90, 60), [13, 14, 15])]
    batch = make_batch(family, model, prompts)
    with vlmfix.attach(model, None, DivPrune(keep_ratio=0.3)) as fixed:
        together = last_logits(fixed(**batch).logits, fixed.last_state)
        rec = fixed.last_state.record(DivPrune)
        gen = fixed.generate(**batch, **GEN)
        assert rec.acted() == [True, False, True]
        for r, prompt in enumerate(prompts):
            alone_batch = make_batch(family, model, [prompt])
            alone = last_logits(fixed(**alone_batch).logits, fixed.last_state)
            torch.testing.assert_close(together[r], alone[0], atol=1e-5, rtol=0)
            alone_gen = fixed.generate(**alone_batch, **GEN)
            new = alone_gen.sequences[0, alone_batch["input_ids"].shape[1]:]
            assert torch.equal(gen.sequences[r, batch["input_ids"].shape[1]:], new)
            torch.testing.assert_close(gen.logits[-1][r], alone_gen.logits[-1][0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_forms_agree_and_the_mask_form_runs_compiled():
    """The mask form chooses the in-place form's tokens and gives its tokens and logits, and runs under a static
    cache and compiled (`probes.assert_forms_agree_and_mask_compiles`)."""
    assert_forms_agree_and_mask_compiles(make_model("llava"), lambda form: DivPrune(keep=6, form=form), TWO, GEN)


@torch.no_grad()
def test_composes_with_var_gift_and_pai():
    """VAR, GIFT and PAI's attention intervention keep naming tokens by prompt position: a pruned token is never
    a sink, gets no saliency, and the runs generate; PAI's contrast branch is refused with the reason."""
    model = make_model("llava")
    batch = make_batch("llava", model, TWO)
    assert_pruned_tokens_are_never_sinks(model, DivPrune(keep=6), TWO, GEN, dropped=19)
    with vlmfix.attach(model, None, [vlmfix.PAI(gamma=1.0), DivPrune(keep=6)]) as fixed:
        fixed.generate(**batch, **GEN)
    with pytest.raises(vlmfix.VlmfixError, match="contrast branch.*DivPrune"):
        vlmfix.attach(model, None, [vlmfix.PAI(), DivPrune(keep=6)])
    with pytest.raises(ValueError, match="at most one pruner"):
        vlmfix.attach(model, None, [vlmfix.FastVPrune(keep=4), DivPrune(keep=6)])


def test_config_checks():
    with pytest.raises(ValueError, match="not both"):
        DivPrune(keep=4, keep_ratio=0.5)
    with pytest.raises(ValueError, match="keep must be a positive"):
        DivPrune(keep=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        DivPrune(keep_ratio=1.5)
    assert vlmfix.methods.build("divprune", "keep64") == DivPrune(keep=64)
    assert vlmfix.methods.build("divprune") == DivPrune(keep=128)


def test_cli_generate_writes_the_kept_map(tmp_path, capsys):
    from families.processors import save

    from vlmfix.cli.main import main

    folder = save("llava", tmp_path / "llava")
    assert main(["generate", "--model", str(folder), "--methods", "divprune:quarter", "--max-new-tokens", "2",
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "kept_tokens.png").is_file() and "kept_tokens.png" in printed


def test_lmms_eval_runs_divprune_and_logs_its_record():
    """lmms-eval's `methods=divprune:quarter` prunes each request's image on the demo VLM and logs its row."""
    logs = lmms_eval_logs("divprune:quarter", max_new_tokens=2)
    assert [log["divprune_kept"] for log in logs] == [36, 36]


@torch.no_grad()
def test_every_family_forms_agree(case):  # noqa: F811 (case: the families' fixture)
    """Images and videos of every family in tests/families: the in-place form chooses the mask form's tokens and
    gives its tokens and logits; where in-place pruning from layer 0 is refused (Qwen3-VL's deepstack), the mask
    form runs."""
    module, model, kind, batch = case
    gen = dict(GEN, max_new_tokens=1)

    def run(form):
        with vlmfix.attach(model, tokenizer(), DivPrune(keep_ratio=0.5, form=form)) as fixed:
            out = fixed.generate(**batch, **gen)
            state = fixed.last_state
        return out.sequences, torch.stack(out.logits), [kept_tokens(state, r).tolist() for r in range(2)], state

    mask = run("mask")
    assert mask[3].record(DivPrune).acted() == [True, True]
    if getattr(get_adapter(model), "deepstack_layers", 0):
        with pytest.raises(vlmfix.VlmfixInputError, match="deepstack"):
            vlmfix.attach(model, None, DivPrune(keep_ratio=0.5))
        return
    inplace = run("inplace")
    assert inplace[2] == mask[2] and torch.equal(inplace[0], mask[0])
    torch.testing.assert_close(inplace[1], mask[1], atol=1e-4, rtol=0)
