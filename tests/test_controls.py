"""The pruning controls (vlmfix.methods.controls): random and pool. Pooling's blocks against the slow reference
(tests/reference_dart.py); the pruned model equals the language model fed only the kept / pooled input
embeddings; keep = all is the model; batch = rows alone; random is seeded and row-independent; pool on the
tiny families' grids (tiles, video frames, newline tokens); compiled static-cache generation (mask form);
composition with VAR and GIFT; configs; the CLI and lmms-eval."""

from __future__ import annotations

import pytest
import torch
from reference_dart import fed_only_reference, pooled_groups_reference
from test_families import FAMILIES, batch_of, model_of, prompts
from test_runtime import moved
from tiny import PAD, make_batch, make_model, prompts_two, tokenizer

import vlmfix
from vlmfix.core.state import ImageSegment
from vlmfix.methods import build, methods, parse_methods
from vlmfix.methods.controls import pool_segment, pooled_shape, random_choice
from vlmfix.methods.prune import kept_tokens, prune_record

GEN = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD)
#: a row with an image, one without, and one with a larger image (left padding, mixed lengths)
PROMPTS = [([1, 5, 6], (30, 30), [7, 8, 9, 10, 11]), ([1, 12, 13, 14], None, [15, 16]),
           ([1, 12], (40, 70), [13, 14, 15, 16, 17, 18, 19, 20])]
CONTROLS = {"random": vlmfix.RandomPrune, "pool": vlmfix.PoolPrune}


def run(model, batch, methods=None, **kw):
    if methods is None:
        out = model.generate(**batch, **GEN, **kw)
        return out.sequences, torch.stack(out.logits), None
    with vlmfix.attach(model, tokenizer(), methods) as fixed:
        out = fixed.generate(**batch, **GEN, **kw)
        state = fixed.last_state
    return out.sequences, torch.stack(out.logits), state


def kept_lists(state):
    return [k.tolist() for k in prune_record(state).stages[0].kept]


@pytest.fixture(scope="module")
def llava():
    return make_model("llava")


@pytest.fixture(scope="module")
def llava_next():
    return make_model("llava_next")


def groups_of(positions, heads) -> list[tuple[int, list[int]]]:
    """(head, the other members, ascending) per group, in the order of the heads."""
    groups = {}
    for p, h in sorted(zip(positions.tolist(), heads.tolist())):
        groups.setdefault(h, []).append(p)
    return [(h, [p for p in members if p != h]) for h, members in sorted(groups.items())]


# -- the choices -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols,budget", [(24, 24, 64), (24, 24, 128), (24, 24, 192), (5, 5, 4), (7, 3, 5),
                                              (2, 9, 7), (4, 4, 1), (6, 10, 59)])
def test_pool_blocks_equal_the_reference(rows, cols, budget):
    seg = ImageSegment(start=100, rows=rows, cols=cols)
    groups = groups_of(*pool_segment(seg, budget))
    want = [[100 + y * cols + x for y, x in block] for block in pooled_groups_reference(rows, cols, budget)]
    assert [[head, *members] for head, members in groups] == want
    assert 1 <= len(groups) <= max(budget, 1) and sorted(p for b in want for p in b) == list(range(100, 100 + rows * cols))
    assert pooled_shape(24, 24, 64) == (8, 8)


def test_pool_keeps_one_newline_per_block_row_never_across_block_rows():
    seg = ImageSegment(start=10, rows=6, cols=4, newline=True)  # LLaVA-NeXT's crops: a newline closes each row
    groups = groups_of(*pool_segment(seg, 9))
    r, c = pooled_shape(6, 4, 9, newline=True)
    assert r * (c + 1) <= 9 and len(groups) == r * (c + 1)
    lines = seg.newline_positions().tolist()
    line_groups = [(h, m) for h, m in groups if h in lines]
    assert len(line_groups) == r
    cuts = [i * 6 // r for i in range(r + 1)]
    for i, (head, members) in enumerate(line_groups):
        assert head == lines[cuts[i + 1] - 1] and members == lines[cuts[i]:cuts[i + 1] - 1]
    for head, members in groups:  # patch blocks hold patches only; every block precedes its block row's newline
        if head not in lines:
            assert not set(members) & set(lines)


def test_random_is_seeded_and_depends_on_the_token_count_only():
    a, _ = random_choice(50, 7, seed=0)
    assert torch.equal(a, random_choice(50, 7, seed=0)[0]) and not torch.equal(a, random_choice(50, 7, seed=1)[0])
    assert len(a.unique()) == 7 and bool((a < 50).all()) and torch.equal(a, a.sort().values)


# -- the pruned model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["inplace", "mask"])
@pytest.mark.parametrize("name,family", [("random", "llava"), ("pool", "llava"), ("pool", "llava_next"),
                                         ("random", "llava_next")])
def test_pruned_model_equals_the_model_fed_only_the_kept_features(name, family, form, llava, llava_next):
    model = llava if family == "llava" else llava_next
    prompt = ([1, 5, 6], (40, 70), [7, 8, 9, 10, 11])
    batch = make_batch(family, model, [prompt])
    with vlmfix.attach(model, None, CONTROLS[name](keep=7, form=form)) as fixed:
        out = fixed.generate(**batch, **GEN)
        state = fixed.last_state
    stage = prune_record(state).stages[0]
    groups = {int(k): [] for k in stage.kept[0]}
    groups.update(stage.groups(0))
    assert (len(stage.groups(0)) > 0) == (name == "pool")
    want = fed_only_reference(model, batch, state.rows[0].image_positions, groups)
    torch.testing.assert_close(out.logits[0][0], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["random", "pool"])
def test_keep_all_is_the_model_exactly(name, llava_next):
    batch = make_batch("llava_next", llava_next, PROMPTS)
    plain = run(llava_next, batch)
    for method in (CONTROLS[name](keep=10_000), CONTROLS[name](keep_ratio=1.0, form="mask")):
        tokens, logits, state = run(llava_next, batch, method)
        assert torch.equal(tokens, plain[0]) and torch.equal(logits, plain[1])
        assert not prune_record(state).stages


@pytest.mark.parametrize("name", ["random", "pool"])
def test_batch_rows_equal_rows_alone_and_forms_agree(name, llava_next):
    batch = make_batch("llava_next", llava_next, PROMPTS)
    together = run(llava_next, batch, CONTROLS[name](keep=6))
    mask = run(llava_next, batch, CONTROLS[name](keep=6, form="mask"))
    assert kept_lists(together[2]) == kept_lists(mask[2])
    assert torch.equal(together[0], mask[0]) and torch.allclose(together[1], mask[1], atol=1e-4, rtol=0)
    assert prune_record(together[2]).acted() == [True, False, True]
    for r, prompt in enumerate(PROMPTS):
        alone = run(llava_next, make_batch("llava_next", llava_next, [prompt]), CONTROLS[name](keep=6))
        shift = together[2].rows[r].pad_left - alone[2].rows[0].pad_left
        assert (kept_tokens(together[2], r) - shift).tolist() == kept_tokens(alone[2]).tolist()
        assert torch.equal(together[0][r, -GEN["max_new_tokens"]:], alone[0][0, -GEN["max_new_tokens"]:])
        torch.testing.assert_close(together[1][:, r], alone[1][:, 0], atol=1e-4, rtol=0)


def test_random_seed_changes_the_choice(llava):
    batch = make_batch("llava", llava, prompts_two())
    first = kept_lists(run(llava, batch, vlmfix.RandomPrune(keep=6, seed=0))[2])
    assert first == kept_lists(run(llava, batch, vlmfix.RandomPrune(keep=6, seed=0))[2])
    assert first != kept_lists(run(llava, batch, vlmfix.RandomPrune(keep=6, seed=3))[2])


# -- every family's grid: tiles, video frames, newline tokens -------------------------------------------------
@pytest.mark.parametrize("name,kind", [("idefics3", "image"), ("internvl", "image"), ("llava_onevision", "video"),
                                       ("qwen2_5_vl", "video")])
def test_pool_on_tiles_and_frames(name, kind):
    """Each grid (tile, frame) is pooled on its own: a kept token's group lies in one segment and forms a
    rectangle of neighbouring cells; the forms agree; every segment keeps at least one token."""
    module = FAMILIES[name]
    model = model_of(name)
    batch = batch_of(name, kind, model, prompts(kind, module))
    ratio = 0.3
    together = run(model, batch, vlmfix.PoolPrune(keep_ratio=ratio))
    mask = run(model, batch, vlmfix.PoolPrune(keep_ratio=ratio, form="mask"))
    assert kept_lists(together[2]) == kept_lists(mask[2])
    assert torch.equal(together[0], mask[0]) and torch.allclose(together[1], mask[1], atol=1e-4, rtol=0)
    stage = prune_record(together[2]).stages[0]
    assert max(len(row.segments) for row in together[2].rows) >= 2, "the case must hold several tiles / frames"
    for r, row in enumerate(together[2].rows):
        kept = set(stage.kept[r].tolist())
        assert len(kept) < len(row.image_positions)
        groups = stage.groups(r)
        for seg in row.segments:
            grid = seg.grid_positions()
            cells = {int(p): (y, x) for y, line in enumerate(grid.tolist()) for x, p in enumerate(line)}
            heads = [p for p in cells if p in kept]
            assert heads, f"segment {seg.name} kept nothing"
            for head in heads:
                members = [cells[p] for p in [head, *groups.get(head, [])]]
                assert all(p in cells for p in [head, *groups.get(head, [])]), "a group crosses segments"
                ys, xs = {y for y, _ in members}, {x for _, x in members}
                assert len(members) == len(ys) * len(xs) and max(ys) - min(ys) == len(ys) - 1 \
                    and max(xs) - min(xs) == len(xs) - 1 and cells[head] == (min(ys), min(xs))


def test_pool_keeps_newlines_consistently_on_llava_next(llava_next):
    batch = make_batch("llava_next", llava_next, [PROMPTS[2]])
    _, _, state = run(llava_next, batch, vlmfix.PoolPrune(keep=12))
    row = state.rows[0]
    kept = set(kept_tokens(state).tolist())
    crops = next(s for s in row.segments if s.newline)
    lines = crops.newline_positions().tolist()
    kept_lines = [p for p in lines if p in kept]
    kept_patches = [p for p in crops.grid_positions().flatten().tolist() if p in kept]
    r = len(kept_lines)
    assert r >= 1 and len(kept_patches) % r == 0 and lines[-1] in kept_lines, "one newline per block row"


# -- compiled generation, composition, configs ------------------------------------------------------------
@pytest.mark.parametrize("name", ["random", "pool"])
def test_compiled_static_cache_mask_form_gives_the_eager_tokens(name, llava):
    from torch._dynamo.utils import counters
    from test_runtime import compile_config

    batch = make_batch("llava", llava, prompts_two())
    torch._dynamo.reset()
    with vlmfix.attach(llava, None, CONTROLS[name](keep=6, form="mask")) as fixed:
        eager = run(fixed, batch)
        kept = kept_lists(fixed.last_state)
        counters.clear()
        if name == "pool":  # one compilation: both controls' decoding steps are the mask form's (random: eager static)
            out = fixed.generate(**batch, **GEN, cache_implementation="static", compile_config=compile_config())
            assert counters["stats"]["unique_graphs"] > 0, "the decoding steps were not compiled"
        else:
            out = fixed.generate(**batch, **GEN, cache_implementation="static", disable_compile=True)
        assert kept_lists(fixed.last_state) == kept
    assert torch.equal(out.sequences, eager[0]) and torch.allclose(torch.stack(out.logits), eager[1], atol=1e-4, rtol=0)
    with vlmfix.attach(llava, None, CONTROLS[name](keep=6)) as fixed:
        with pytest.raises(vlmfix.VlmfixError, match="form='mask'"):
            fixed.generate(**batch, **GEN, cache_implementation="static", disable_compile=True)


@pytest.mark.parametrize("name", ["random", "pool"])
def test_composes_with_var_and_gift(name, llava):
    batch = make_batch("llava", llava, prompts_two())
    outs = []
    for form in ("inplace", "mask"):
        chosen = [vlmfix.VAR(tau=0.8, m_min=0.05, rho=0.3),
                  vlmfix.GIFT(alpha=3.0, saliency_layers=(1,), boost_layers=(2, 3)), CONTROLS[name](keep=10, form=form)]
        with vlmfix.attach(llava, tokenizer(), chosen, sink_dims=[0, 1]) as fixed:
            out = fixed.generate(**batch, **GEN)
            outs.append((out.sequences, torch.stack(out.logits)))
            state = fixed.last_state
            assert moved(state) > 0 and bool(state.record(vlmfix.GIFT).has_map.any()), "VAR and GIFT must act"
    alone = run(llava, batch, CONTROLS[name](keep=10))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1], atol=1e-4, rtol=0)
    assert (outs[0][1] - alone[1]).abs().max() > 1e-4


@pytest.mark.parametrize("cls", [vlmfix.RandomPrune, vlmfix.PoolPrune])
@pytest.mark.parametrize("kwargs,message", [
    (dict(layer=-1), "layer must be an int >= 0"), (dict(keep=0), "keep must be a positive"),
    (dict(keep=4, keep_ratio=0.5), "not both"), (dict(keep_ratio=0.0), "keep_ratio"), (dict(form="x"), "form")])
def test_bad_configs(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        vlmfix.RandomPrune(seed=-1)


def test_registry_and_presets():
    assert methods()["random"].config is vlmfix.RandomPrune and methods()["pool"].config is vlmfix.PoolPrune
    assert build("random") == vlmfix.RandomPrune(keep=128) and build("pool", "keep64") == vlmfix.PoolPrune(keep=64)
    assert parse_methods("pool:keep128-mask,var")[0] == vlmfix.PoolPrune(keep=128, form="mask")


@pytest.mark.smollm2
@pytest.mark.parametrize("spec", ["random:keep64", "pool:keep64"])
def test_cli_generate(spec, tmp_path):
    import json

    from vlmfix.cli.main import main

    assert main(["generate", "--methods", spec, "--max-new-tokens", "2", "--out", str(tmp_path)]) == 0
    run_, = json.loads((tmp_path / "generate.json").read_text())["runs"]
    assert run_["methods"] == spec and "keep=64" in run_["configs"][0]
    assert (tmp_path / "kept_tokens.png").is_file()


@pytest.mark.smollm2
def test_lmms_eval_runs_the_pruners_and_logs_their_records():
    """lmms-eval's `methods=...` attaches each new pruner on the demo (144 image tokens) and the sample log holds
    the kept count of each request's row."""
    pytest.importorskip("lmms_eval")
    from types import SimpleNamespace

    from PIL import Image

    from vlmfix.integrations.lmms_eval import VlmfixLMM

    for spec, name in (("dart:keep64", "dart"), ("random:keep64", "random"), ("pool:keep64", "pool")):
        lmm = VlmfixLMM.create_from_arg_string(f"pretrained=demo,methods={spec}", {"batch_size": 2, "device": None})
        try:
            docs = {0: Image.new("RGB", (96, 64), (200, 40, 40)), 1: Image.new("RGB", (64, 96), (40, 160, 60))}
            lmm.task_dict = {"task": {"test": docs}}
            gen = {"max_new_tokens": 2, "until": ["\n"]}
            requests = [SimpleNamespace(args=(f"What is in the image? {i}", gen, lambda doc: [doc], i, "task", "test"))
                        for i in docs]
            results = lmm.generate_until(requests)
        finally:
            lmm.detach()
        logs = [r.token_counts.to_dict()["vlmfix"] for r in results]
        assert [log[f"{name}_kept"] for log in logs] == [64, 64], logs
