"""The demo VLM: the committed weights load into a plain LLaVA, answer POPE questions about held-out
EmojiCOCO images above chance, and every method attaches, generates and detaches on it. Plus the
recipe's pieces that the committed model depends on (token layout, LoRA merge)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmfix import attach
from vlmfix.methods import parse_methods
from vlmfix.demo.assemble import prompt_for
from vlmfix.demo.check import check_model
from vlmfix.demo.lora import LoRALinear, add_lora, lora_state, merge_lora
from vlmfix.data.prompts import POPE_SUFFIX, yes_no_question
from vlmfix.demo.train import conversation, encode

METHOD_SPECS = ["var", "gift", "fastv:quarter-debiased", "var,gift,fastv:quarter-debiased"]
SETTINGS = dict(max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def demo():
    from vlmfix import load_demo

    return load_demo()


def test_demo_is_a_plain_llava_with_144_padded_image_tokens(demo):
    from transformers import LlavaForConditionalGeneration

    model, processor = demo
    assert type(model) is LlavaForConditionalGeneration
    assert processor.image_processor.do_pad
    inputs = processor(images=Image.new("RGB", (300, 120)), text=prompt_for("Describe."), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 144
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_demo_answers_pope_questions_above_chance(demo):
    # 20 held-out images (world seed 0, training used seed 1): one present and one absent object each
    result = check_model(*demo, seed=0, n_images=20, n_captions=0)
    assert result["other_answers"] == 0.0
    assert result["yes_no_accuracy"] >= 0.65, result
    assert 0.15 <= result["yes_ratio"] <= 0.85, result


@pytest.fixture(scope="module")
def showcase(demo):
    from vlmfix.data.world import draw_image

    model, processor = demo
    inputs = processor(images=draw_image(0, 3)[0], text=prompt_for("Please describe this image in detail."),
                       return_tensors="pt")
    with torch.no_grad():
        return inputs, model.generate(**inputs, **SETTINGS)


@pytest.mark.parametrize("spec", METHOD_SPECS)
def test_each_method_attaches_generates_and_detaches(demo, showcase, spec):
    model, processor = demo
    inputs, plain = showcase
    with torch.no_grad():
        with attach(model, processor, parse_methods(spec)) as fixed:
            out = fixed.generate(**inputs, **SETTINGS)
            assert fixed.last_state is not None
        after = model.generate(**inputs, **SETTINGS)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(plain, after)


def test_training_conversation_matches_the_processor_prompt(demo):
    _, processor = demo
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    question = yes_no_question("dining table")
    assert question == f"Is there a dining table in the image?{POPE_SUFFIX}"
    ids, labels = encode(tokenizer, [(question, "Yes")], image_id, 144)
    reference = processor(images=Image.new("RGB", (50, 40)), text=prompt_for(question) + "Yes<|im_end|>\n",
                          return_tensors="pt")["input_ids"][0].tolist()
    assert ids == reference
    learned = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tokenizer.decode(learned) == "Yes<|im_end|>"


def test_answer_only_logits_give_the_full_logits_loss(demo):
    import random

    import torch.nn.functional as F

    from vlmfix.demo.train import answer_logits, collate

    model, processor = demo
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    rng = random.Random(0)
    convs = [conversation(rng, present, [caption], 2) for present, caption in
             ((["cat", "dog"], "A cat and a dog."), (["cup"], "A picture of a cup on a table."))]
    batch = collate([encode(tokenizer, turns, image_id, 144) for turns in convs], tokenizer.pad_token_id)
    pixels = processor.image_processor(images=[Image.new("RGB", (60, 40), "red"), Image.new("RGB", (40, 60), "blue")],
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels).logits
        reference = F.cross_entropy(full[:, :-1].reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                    ignore_index=-100)
        logits, targets = answer_logits(model, batch, pixels)
    n_learned = int((batch["labels"] != -100).sum())
    assert logits.shape == (n_learned, full.shape[-1]) and targets.shape == (n_learned,)
    assert n_learned < batch["labels"].numel() / 4  # most positions never reach the output layer
    assert torch.allclose(F.cross_entropy(logits, targets), reference, atol=1e-5)


def test_conversation_balances_present_and_absent_questions():
    import random

    turns = conversation(random.Random(0), ["cat", "dog", "cup"], ["A cat, a dog and a cup."], 4)
    answers = [a for _, a in turns]
    assert answers.count("Yes") == 2 and answers.count("No") == 2 and len(turns) == 5
    asked = [q.split(" in the image")[0] for q, a in turns if a == "No"]
    assert not any(name in q for q in asked for name in ("cat", "dog", "cup"))


def test_merged_lora_equals_the_wrapped_forward():
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("q_proj", torch.nn.Linear(12, 8))
    reference = torch.nn.Sequential()
    reference.add_module("q_proj", torch.nn.Linear(12, 8))
    reference.load_state_dict(base.state_dict())
    add_lora(base, rank=4, alpha=8.0)
    assert isinstance(base.q_proj, LoRALinear)
    with torch.no_grad():
        base.q_proj.lora_b.normal_()
    x = torch.randn(5, 12)
    wrapped = base(x)
    merge_lora(reference, lora_state(base), alpha=8.0)
    assert torch.allclose(reference(x), wrapped, atol=1e-5)
    assert not torch.allclose(reference(x), base.q_proj.base(x), atol=1e-3)


def test_results_report_and_sink_profile(demo, tmp_path):
    from vlmfix.data.world import generate_world
    from vlmfix.demo.results import report, sink_plot, sink_profile

    world = tmp_path / "world"
    generate_world(world, 4, seed=0)
    sinks = sink_profile(*demo, world, n_images=2)
    layers = sorted(sinks)
    assert layers[0] == 2 and layers[-1] == demo[0].config.text_config.num_hidden_layers - 1
    assert all(0.0 <= v["share"] <= 1.0 and v["text_phi"] > 0 and v["image_phi"] > 0 for v in sinks.values())
    assert sink_plot(sinks, 20.0, tmp_path / "phi.png").stat().st_size > 0

    meta = {"command": "vlmfix demo results", "minutes": 1.0, "device": "CPU", "date": "2026-11-28", "images": 4,
            "chair_max_new_tokens": 128, "share_images": 2, "tau": 20.0}
    text = report("# vlmfix compare\n\n## pope on demo\n\n| table |", sinks, meta)
    assert text.startswith("# Results on the demo VLM") and "# vlmfix compare" not in text
    assert "## pope on demo\n\n| table |" in text and "at most 128 new tokens" in text
    none = {2: {"share": 0.0, "image_phi": 12.5, "text_phi": 23.0}, 3: {"share": 0.0, "image_phi": 14.0, "text_phi": 23.0}}
    assert "No image token reached tau in any layer (largest image-token phi 14.0)" in report("", none, meta)
    some = {2: {"share": 0.25, "image_phi": 30.0, "text_phi": 23.0}, 3: {"share": 0.5, "image_phi": 31.0, "text_phi": 23.0}}
    assert "Highest shares: layer 3 50 %, layer 2 25 %." in report("", some, meta)


def test_demo_results_by_default_writes_under_out_not_docs(tmp_path, monkeypatch):
    """`vlmfix demo results` with default arguments leaves committed files alone: the report goes to
    out/demo-results/results.md (the evaluation itself is stubbed: only where things land is checked)."""
    from types import SimpleNamespace

    import vlmfix.eval.compare
    import vlmfix.data.world
    import vlmfix.demo.load
    from vlmfix.cli import main as cli
    from vlmfix.demo import results

    config = SimpleNamespace(_name_or_path="demo", text_config=SimpleNamespace(hidden_size=7))
    monkeypatch.setattr(vlmfix.demo.load, "load_demo", lambda weights=None: (SimpleNamespace(config=config), None))
    monkeypatch.setattr(vlmfix.data.world, "generate_world", lambda *a, **k: None)

    def run_grid(grid, command, loader):  # the grid's report and one plot, where compare writes them
        grid.out.mkdir(parents=True, exist_ok=True)
        (grid.out / "report.md").write_text("# vlmfix compare\n\n![bars](metrics.png)\n")
        (grid.out / "metrics.png").write_text("plot")
        assert loader("demo", "float32")[0].config is config
        return {"plots": {"bars": "metrics.png"}}

    monkeypatch.setattr(vlmfix.eval.compare, "run_grid", run_grid)
    monkeypatch.setattr(results, "sink_profile", lambda *a: {})
    monkeypatch.setattr(results, "sink_plot", lambda sinks, tau, path: path.write_text("plot"))
    monkeypatch.setattr(results, "report", lambda text, sinks, meta: "report " + text)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "demo-results").mkdir(parents=True)
    assert cli.main(["demo", "results", "--n-images", "2"]) == 0
    assert (tmp_path / "out" / "demo-results" / "results.md").read_text().startswith("report # vlmfix compare")
    assert "](results_metrics.png)" in (tmp_path / "out" / "demo-results" / "results.md").read_text()
    assert (tmp_path / "out" / "demo-results" / "results_sink_phi.png").exists()
    assert (tmp_path / "out" / "demo-results" / "results_metrics.png").exists()
    assert not (tmp_path / "docs").exists()
    assert cli.main(["demo", "results", "--n-images", "2", "--doc", "docs/results.md"]) == 0  # only when named
    assert (tmp_path / "docs" / "results.md").read_text().startswith("report ")


def test_demo_train_refuses_fewer_images_than_a_batch(tmp_path):
    from dataclasses import replace

    from vlmfix.demo.train import Recipe, train

    with pytest.raises(ValueError, match=r"--n-images 16 is fewer than one training batch .* --n-images 48 or more"):
        train(tmp_path, replace(Recipe(), steps=2, pretrain_steps=2, n_images=16))
    assert not any(tmp_path.iterdir()), "nothing is written for a recipe that cannot run"
