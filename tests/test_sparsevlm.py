"""SparseVLM (vlmfix.methods.sparsevlm) against the slow reference (tests/reference_sparsevlm.py) on the tiny models:
raters, rank-based counts, recycling, both forms; neutral settings, batches, compiled generation, composition,
configs, the CLI and lmms-eval."""

from __future__ import annotations

import pytest
import torch
from reference_sparsevlm import dpc_knn_reference, raters_reference, sparsevlm_reference
from test_compose import VAR_TINY, gift_prompts, moved
from test_families import case  # noqa: F401 (the families' fixture: images, tiles and video frames)
from test_families import run as run_family
from tiny import PAD, make_batch, make_model, prompts_two, tokenizer

import vlmfix
from vlmfix.core.errors import VlmfixError
from vlmfix.methods import build
from vlmfix.methods.prune import prune_record
from vlmfix.methods.sparsevlm import SparseVLM, density_peaks, select_raters
from probes import lmms_eval_logs

GEN = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)


def bigger(prompts):
    """Images that give every family at least 24 image tokens (Qwen2-VL's 30 x 30 image has one)."""
    sizes = [(112, 168), (168, 112), (112, 112)]
    return [(p[0], None if p[1] is None else sizes[k], p[2]) for k, p in enumerate(prompts)]


def run(model, batch, methods, processor=None, **kw):
    with vlmfix.attach(model, processor, methods) as fixed:
        out = fixed.generate(**batch, **GEN, **kw)
        state = fixed.last_state
    return out.sequences, torch.stack(out.logits), state


def kept_lists(state):
    return [[k.tolist() for k in stage.kept] for stage in prune_record(state).stages]


def assert_forms_agree(model, batch, make, processor=None):
    a, b = run(model, batch, make("inplace"), processor), run(model, batch, make("mask"), processor)
    assert kept_lists(a[2]) == kept_lists(b[2]), "the two forms chose different tokens"
    assert prune_record(a[2]).groups == prune_record(b[2]).groups, "the two forms recycled differently"
    assert torch.equal(a[0], b[0]), "greedy tokens differ"
    assert torch.allclose(a[1], b[1], atol=1e-4, rtol=0), f"logits differ by {(a[1] - b[1]).abs().max()}"
    return a, b


# -- the parts on hand-sized inputs ------------------------------------------------------------------
def test_raters_and_density_peaks_equal_the_reference():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(12, 8, generator=g)
    image, text = [0, 1, 2, 3, 4], [6, 7, 8, 9, 10, 11]
    chosen = torch.tensor(text)[select_raters(emb[image], emb[text])].tolist()
    assert chosen == raters_reference(emb, image, text) and 0 < len(chosen) < len(text)
    # two blobs of points: two centres, one per blob, every point with its own blob
    x = torch.cat([torch.randn(6, 4, generator=g) * 0.1, 5 + torch.randn(5, 4, generator=g) * 0.1])
    centres, assign = density_peaks(x, 2, 3)
    assert sorted(int(c) < 6 for c in centres) == [False, True]
    blob = (assign == assign[0])
    assert blob.tolist() == [True] * 6 + [False] * 5
    for m, k, nn in ((9, 3, 5), (7, 1, 2), (4, 4, 5), (1, 1, 5)):
        x = torch.randn(m, 6, generator=g)
        centres, assign = density_peaks(x, k, nn)
        ref_centres, ref_assign = dpc_knn_reference(x, k, nn)
        assert centres.tolist() == ref_centres and assign.tolist() == ref_assign


@pytest.mark.parametrize("kw", [dict(keeps=(14, 6)), dict(keep=5, rank_scale=0.05)])
def test_equals_the_reference(family, model, kw):
    """Raters, kept tokens, recycled groups and the logits of both forms equal the reference's (which masks the
    deleted tokens out and writes the recycled features: a model fed only the kept and merged tokens from each
    stage on); rank_scale 0.05 makes the rank-based count keep more than the budget, which the record notes."""
    batch = make_batch(family, model, bigger(prompts_two())[:1])
    reference = None
    for form in ("inplace", "mask"):
        method = SparseVLM(layers=(1, 3), form=form, **kw)
        with vlmfix.attach(model, None, method) as fixed:
            logits = fixed(**batch).logits[0, -1].float()
            rec = prune_record(fixed.last_state)
            budgets = [fixed.runtimes[0].budget(s, rec.image_tokens[0]) for s in range(2)]
        if reference is None:
            reference = sparsevlm_reference(model, batch, (1, 3), budgets, rank_scale=method.rank_scale)
        raters, stages, ref_logits = reference
        assert rec.raters[0].tolist() == raters
        assert [s.kept[0].tolist() for s in rec.stages] == [kept for kept, _ in stages]
        assert [g[0] for g in rec.groups] == [groups for _, groups in stages]
        assert any(stages[s][1] for s in range(2)), "nothing was recycled"
        assert torch.allclose(logits, ref_logits, atol=1e-4), (logits - ref_logits).abs().max()
        noted = any("the rank-based count kept" in n for n in rec.budget_notes)
        final = kw.get("keep") or kw["keeps"][-1]
        assert noted == ("rank_scale" in kw) and (len(stages[-1][0]) > final) == noted


def test_keep_all_is_exact(family, model):
    batch = make_batch(family, model, prompts_two())
    ref = run(model, batch, [])
    for method in (SparseVLM(layers=(1, 2), keep=10_000), SparseVLM(layers=(1, 3), keep_ratio=1.0, form="mask")):
        got = run(model, batch, method)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert prune_record(got[2]).stages == []


def test_batch_rows_equal_rows_alone(family, model, form="inplace"):
    prompts = bigger(prompts_two() + [([1, 3, 4], None, [5, 6])])
    batch = make_batch(family, model, prompts)
    assert (batch["attention_mask"] == 0).any()
    method = SparseVLM(layers=(1, 3), keep_ratio=0.25, form=form)
    tokens, logits, state = run(model, batch, method, tokenizer())
    rec = prune_record(state)
    assert rec.acted() == [True, True, False] and rec.stages[0].kept[2].numel() == 0
    for r, p in enumerate(prompts):
        alone = run(model, make_batch(family, model, [p]), method, tokenizer())
        shift = state.rows[r].pad_left - alone[2].rows[0].pad_left
        assert tokens[r, state.rows[r].pad_left:].tolist() == alone[0][0, alone[2].rows[0].pad_left:].tolist()
        assert torch.allclose(logits[:, r], alone[1][:, 0], atol=1e-4)
        if p[1] is None:
            assert prune_record(alone[2]).stages == []
            continue
        assert [(k[r] - shift).tolist() for k in (s.kept for s in rec.stages)] == \
            [s.kept[0].tolist() for s in prune_record(alone[2]).stages]
        assert [{c - shift: [m - shift for m in g] for c, g in row[r].items()} for row in rec.groups] == \
            [row[0] for row in prune_record(alone[2]).groups]


def test_record_merges_and_heat_map(tmp_path):
    from vlmfix.viz import record_heat_maps

    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    _, _, state = run(model, batch, SparseVLM(layers=(1, 3), keeps=(12, 5)))
    rec = prune_record(state)
    owner = state.merged_into(3)
    for s, layer in enumerate((1, 3)):
        for r in range(2):
            for centre, members in rec.groups[s][r].items():
                assert centre in rec.stages[s].kept[r].tolist() and centre in members
                assert state.slot_map(layer).group(r, centre).tolist() == members
    assert owner is not None and (owner >= 0).any()
    assert rec.row(0) == {"kept": 5, "raters": len(rec.raters[0]), "recycled": sum(len(g[0]) for g in rec.groups)}
    assert rec.to_json()["groups"][0][0]
    lines = record_heat_maps(state, tmp_path, row=1)
    assert (tmp_path / "kept_tokens.png").stat().st_size > 0 and any("recycled" in line for line in lines)


def test_compiled_static_cache_generation_mask_form_equals_eager():
    from torch._dynamo.utils import counters

    from test_runtime import compile_config, compile_prompts, generate

    model = make_model("llava")
    batch = make_batch("llava", model, compile_prompts("llava"))
    method = SparseVLM(layers=(1, 3), keeps=(12, 5), form="mask")
    plain = generate(model, batch)
    with vlmfix.attach(model, None, method) as fixed:
        eager = generate(fixed, batch)
        counters.clear()
        compiled = generate(fixed, batch, cache_implementation="static", compile_config=compile_config())
        assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        assert prune_record(fixed.last_state).groups[0][0], "nothing was recycled"
    assert not torch.allclose(eager[1], plain[1], atol=1e-3)
    assert torch.equal(compiled[0], eager[0]) and torch.allclose(compiled[1], eager[1], atol=1e-4, rtol=0)
    with vlmfix.attach(model, None, SparseVLM(layers=(1, 3), keeps=(12, 5))) as fixed:
        with pytest.raises(VlmfixError, match="form='mask'"):
            fixed.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=PAD, cache_implementation="static")


def test_composes_with_var_and_gift(family, model):
    batch = make_batch(family, model, gift_prompts())
    make = lambda form: [vlmfix.VAR(**VAR_TINY), vlmfix.GIFT(alpha=3.0, saliency_layers=(2,), boost_layers=(3,)),  # noqa: E731
                         SparseVLM(layers=(1, 2), keeps=(20, 10), form=form)]
    with vlmfix.attach(model, tokenizer(), make("inplace"), sink_dims=[0, 1]) as fixed:
        a = fixed.generate(**batch, **GEN)
        sa = fixed.last_state
    with vlmfix.attach(model, tokenizer(), make("mask"), sink_dims=[0, 1]) as fixed:
        b = fixed.generate(**batch, **GEN)
        sb = fixed.last_state
    assert kept_lists(sa) == kept_lists(sb) and torch.equal(a.sequences, b.sequences)
    assert torch.allclose(torch.stack(a.logits), torch.stack(b.logits), atol=1e-4)
    assert abs(moved(sa) - moved(sb)) < 1e-4
    alone = run(model, batch, SparseVLM(layers=(1, 2), keeps=(20, 10)), tokenizer())
    assert not torch.allclose(torch.stack(a.logits), alone[1], atol=1e-4), "VAR / GIFT changed nothing"


def test_debias_applies_to_its_scores():
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    plain = run(model, batch, SparseVLM(layers=(1,), keep=4, recycle_ratio=0))
    debiased = run(model, batch, SparseVLM(layers=(1,), keep=4, recycle_ratio=0,
                                           debias=vlmfix.Debias(trend={"family": "exp", "mu": 1.0, "sigma": 8.0})))
    assert prune_record(plain[2]).raw_scores(0)[0].tolist() == prune_record(debiased[2]).raw_scores(0)[0].tolist()
    assert kept_lists(plain[2]) != kept_lists(debiased[2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=(0, 2)), "layers"),
    (dict(layers=(6, 2)), "strictly increasing"),
    (dict(keep=0), "keep must be a positive"),
    (dict(keep=64, keep_ratio=0.5), "takes one budget"),
    (dict(keeps=(10, 20, 5)), "keeps must be strictly decreasing"),
    (dict(keeps=(10, 5)), "per layer"),
    (dict(keep_ratios=(0.5, 0.2, 1.5)), "keep_ratio"),
    (dict(rank_scale=0), "rank_scale"),
    (dict(recycle_ratio=1.5), "recycle_ratio"),
    (dict(cluster_ratio=0), "cluster_ratio"),
    (dict(neighbours=0), "neighbours"),
    (dict(form="fast"), "form"),
    (dict(debias="yes"), "debias"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseVLM(**kwargs)


def test_layers_beyond_the_model_and_one_pruner():
    model = make_model("llava")
    with pytest.raises(ValueError, match="out of range"):
        vlmfix.attach(model, None, SparseVLM())  # 2, 6, 15 on a 4-layer model
    with pytest.raises(ValueError, match="at most one pruner"):
        vlmfix.attach(model, None, [SparseVLM(layers=(1,)), vlmfix.FastVPrune(layer=2)])


def test_registry_presets_and_calibration():
    from vlmfix.eval.calibrate import pruner_scores, pruners, scoring_pruner

    assert "sparsevlm" in pruners()
    default = build("sparsevlm")
    assert default.stage_layers() == (2, 6, 15) and default.keep == 128 and default.form == "inplace"
    assert [build("sparsevlm", p).keep for p in ("keep64", "keep128", "keep192")] == [64, 128, 192]
    scorer = scoring_pruner("sparsevlm")
    assert scorer.form == "mask" and scorer.debias is None and scorer.stage_layers() == (2,)
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    got = list(pruner_scores(model, None, [batch], SparseVLM(layers=(2,))))
    _, _, state = run(model, batch, SparseVLM(layers=(2,), keep=3))
    assert len(got) == 2 and all(torch.allclose(a, b.double(), atol=1e-7) for a, b in zip(got, prune_record(state).raw_scores(0)))


@pytest.mark.smollm2
def test_cli_generate_and_lmms_eval(tmp_path, capsys):
    from vlmfix.cli.main import main

    assert main(["generate", "--methods", "sparsevlm:keep64", "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kept_tokens.png" in out and (tmp_path / "kept_tokens.png").is_file()
    logs = lmms_eval_logs("sparsevlm:keep64", max_new_tokens=2)
    assert [log["sparsevlm_kept"] for log in logs] == [64, 64] and all(log["sparsevlm_raters"] > 0 for log in logs)


def test_pdrop_preset_ranks_by_the_last_token():
    """StagedPrune(scoring="last") ranks as FastV does (the last real token's attention): PyramidDrop's criterion."""
    pdrop = build("staged", "pdrop")
    assert pdrop.stage_layers() == (8, 16, 24) and list(pdrop.keep_ratios) == [0.5, 0.25, 0.125]
    assert pdrop.scoring == "last" and build("staged").scoring == "text"
    with pytest.raises(ValueError, match="scoring"):
        vlmfix.StagedPrune(scoring="first")
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    staged = run(model, batch, vlmfix.StagedPrune(layers=(2,), keep_ratios=(0.3,), scoring="last"))
    fastv = run(model, batch, vlmfix.FastVPrune(layer=2, keep_ratio=0.3))
    text = run(model, batch, vlmfix.StagedPrune(layers=(2,), keep_ratios=(0.3,)))
    assert kept_lists(staged[2]) == kept_lists(fastv[2]) != kept_lists(text[2])
    assert torch.equal(staged[0], fastv[0]) and torch.equal(staged[1], fastv[1])


def test_every_family_grid_forms_agree_or_inplace_is_refused(case):  # noqa: F811
    """Images, tiles and video frames of every family of tests/families: both forms recycle the same groups and
    give the same tokens (the in-place form where the family allows it; else refused naming the mask form)."""
    module, model, _, batch = case
    make = lambda form: SparseVLM(layers=(2, 3), keeps=(8, 4), rank_scale=None, form=form)  # noqa: E731
    masked = run_family(model, batch, make("mask"))
    rec = prune_record(masked[2])
    for row in masked[2].rows:
        assert len(rec.stages[-1].kept[row.index]) == 4
        assert set(rec.stages[-1].kept[row.index].tolist()) <= set(row.image_positions.tolist())
    assert any(g for stage in rec.groups for g in stage), "nothing was recycled"
    if not module.PRUNE_IN_PLACE:
        with pytest.raises(vlmfix.VlmfixInputError, match="form='mask'"):
            vlmfix.attach(model, tokenizer(), make("inplace"))
        return
    inplace = run_family(model, batch, make("inplace"))
    assert kept_lists(inplace[2]) == kept_lists(masked[2]) and prune_record(inplace[2]).groups == rec.groups
    assert torch.equal(inplace[0], masked[0])
    assert torch.allclose(inplace[1], masked[1], atol=1e-4, rtol=0), (inplace[1] - masked[1]).abs().max()


@pytest.mark.smollm2
def test_cli_calibrate_trend_sparsevlm(tmp_path, capsys):
    """`vlmfix calibrate-trend --pruner sparsevlm` fits SparseVLM's first-stage scores (layer 2, rated at 1)."""
    import json

    import yaml
    from PIL import Image

    from vlmfix.cli.main import main

    world = tmp_path / "world"
    (world / "images").mkdir(parents=True)
    images = []
    for i, (size, colour) in enumerate((((120, 90), "red"), ((90, 120), "blue")), 1):
        Image.new("RGB", size, colour).save(world / "images" / f"{i:06d}.png")
        images.append({"id": i, "file_name": f"{i:06d}.png", "width": size[0], "height": size[1]})
    (world / "instances.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    out = tmp_path / "trends" / "smol__sparsevlm.yaml"
    assert main(["calibrate-trend", "--model", "smollm2-llava-small", "--data", str(world), "--n-images", "2",
                 "--pruner", "sparsevlm", "--match", "smol-calib", "--out", str(out)]) == 0
    assert "exp trend over 2 images" in capsys.readouterr().out
    assert yaml.safe_load(out.read_text())["family"] == "exp" and "stage layer 2" in out.read_text()
