"""One registration makes a method known everywhere: `vlmfix.<Name>`, attach, the CLI's parser and
`vlmfix methods`, lmms-eval's `methods=`, the runner's records, the heat maps; a package outside vlmfix
registers through the `vlmfix.methods` entry point. The toy method here is defined in this test module."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from tiny import make_batch, make_model, prompts_two

import vlmfix
from vlmfix.methods import registry
from vlmfix.methods.base import BiasesScores, MethodCall, Phase, Record, Runtime, check_number, raise_problems

GEN = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)


@dataclass
class ImageBias(vlmfix.MethodConfig):
    """Adds `delta` to the pre-softmax scores of the image keys of every decoding step (a toy)."""

    delta: float = 2.0

    def __post_init__(self) -> None:
        raise_problems("ImageBias", [check_number("delta", self.delta, 0.0)])


class ImageBiasRecord(Record):
    acts: ClassVar[str] = "biased image keys"

    def __init__(self, rows: int, acting: list[bool]):
        self.rows, self.acting = rows, acting

    def acted(self) -> list[bool]:
        return list(self.acting)

    def row(self, row: int) -> dict:
        return {"biased": self.acting[row]}

    def notes(self, row: int) -> list[str]:
        return [] if self.acting[row] else ["no image in this row"]


class ImageBiasCall(MethodCall, BiasesScores):
    record_type = ImageBiasRecord

    def __init__(self, runtime: "ImageBiasRuntime", state):
        self.delta = runtime.config.delta
        self.image = state.image_mask().float()  # (B, P)
        super().__init__(runtime, ImageBiasRecord(state.batch_size, [r.has_image for r in state.rows]))

    def queries(self, block, state):
        return range(block.q_len) if block.phase is Phase.DECODE and self.delta else None

    def bias(self, block, state, queries, scores):
        p = self.image.shape[1]
        scores[..., :p] += self.delta * self.image[:, None, None, :]
        return scores


class ImageBiasRuntime(Runtime):
    call = ImageBiasCall

    def start(self, state):
        return ImageBiasCall(self, state)


@pytest.fixture
def toy():
    entry = vlmfix.register_method(name="image_bias", config=ImageBias, runtime=ImageBiasRuntime,
                                   summary="a toy: image keys get +delta")
    yield entry
    registry.unregister_method("image_bias")


def generate(model, batch, **kw):
    out = model.generate(**batch, **GEN, **kw)
    return out.sequences, torch.stack(out.logits)


def test_registration_reaches_attach_cli_and_lmms_eval(toy, tmp_path, capsys):
    from vlmfix.cli.main import build_parser, cmd_methods
    from vlmfix.integrations.lmms_eval import method_spec, row_records
    from vlmfix.methods import parse_methods
    from vlmfix.viz import record_heat_maps

    assert vlmfix.ImageBias is ImageBias and ImageBias.name == "image_bias" and "ImageBias" in dir(vlmfix)
    args = build_parser().parse_args(["generate", "--methods", "var,image_bias", "image_bias"])
    sets = [parse_methods(spec) for spec in args.methods]
    assert [type(m) for m in sets[0]] == [vlmfix.VAR, ImageBias] and sets[1] == [ImageBias()]
    assert [type(m) for m in parse_methods(method_spec("image_bias+var"))] == [ImageBias, vlmfix.VAR]  # methods=
    cmd_methods(None)
    assert "image_bias" in capsys.readouterr().out

    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    plain = generate(model, batch)
    with vlmfix.attach(model, None, ImageBias(delta=0.0)) as fixed:
        assert torch.equal(generate(fixed, batch)[1], plain[1]), "delta = 0 must be the model alone"
    with vlmfix.attach(model, None, parse_methods("image_bias")) as fixed:
        ours = generate(fixed, batch)
        rows = row_records(fixed, "image_bias", 0, 0, 2)
        lines = record_heat_maps(fixed.last_state, tmp_path)
    assert (ours[1][1:] - plain[1][1:]).abs().max() > 1e-3, "the bias must change the decoding steps"
    assert [r["image_bias_biased"] for r in rows] == [True, True]
    assert lines == [], "a record without heat maps draws none"


def test_runner_counts_a_registered_methods_activity(toy, tmp_path):
    from vlmfix.eval.runner import _acted

    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    with vlmfix.attach(model, None, ImageBias()) as fixed:
        fixed.generate(**batch, max_new_tokens=2, do_sample=False)
        assert _acted(fixed, 2) == [{"image_bias": True}, {"image_bias": True}]
        assert json.loads(json.dumps(fixed.last_state.records[0].to_json()))["method"] == "image_bias"


def test_a_package_registers_through_the_entry_point(tmp_path, monkeypatch):
    """A distribution on sys.path with a `vlmfix.methods` entry point is loaded on the registry's first look-up."""
    (tmp_path / "toyplug.py").write_text(
        "from dataclasses import dataclass\n"
        "import vlmfix\n"
        "from vlmfix.methods.base import Runtime\n"
        "@dataclass\n"
        "class Plugged(vlmfix.MethodConfig):\n"
        "    strength: float = 1.0\n"
        "class PluggedRuntime(Runtime):\n"
        "    pass\n"
        "vlmfix.register_method(name='plugged', config=Plugged, runtime=PluggedRuntime, summary='from a plug-in')\n")
    info = tmp_path / "toyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmfix.methods]\nplugged = toyplug\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        assert "plugged" in registry.methods()
        assert vlmfix.Plugged is sys.modules["toyplug"].Plugged
        assert registry.parse_methods("plugged") == [vlmfix.Plugged()]
        model = make_model("llava")
        with vlmfix.attach(model, None, vlmfix.Plugged()) as fixed:
            assert not fixed.active, "a method with no capability leaves every layer on the fast path"
    finally:
        registry.unregister_method("plugged")
        sys.modules.pop("toyplug", None)


def test_registration_refuses_what_would_clash(toy):
    @dataclass
    class Other(vlmfix.MethodConfig):
        pass

    with pytest.raises(ValueError, match="taken"):
        vlmfix.register_method(name="image_bias", config=Other, runtime=ImageBiasRuntime)
    with pytest.raises(ValueError, match="already registered"):
        vlmfix.register_method(name="image_bias2", config=ImageBias, runtime=ImageBiasRuntime)
    with pytest.raises(ValueError, match="lower-case word"):
        vlmfix.register_method(name="a,b", config=Other, runtime=ImageBiasRuntime)
    with pytest.raises(TypeError, match="not registered"):
        Other().bind(None)
    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*image_bias"):
        registry.parse_methods("var,nope")


def test_lmms_eval_model_attaches_a_registered_method(toy):
    pytest.importorskip("lmms_eval")
    from vlmfix.integrations.lmms_eval import VlmfixLMM

    lmm = VlmfixLMM.create_from_arg_string("pretrained=demo,methods=image_bias+var", {"batch_size": 1, "device": None})
    try:
        assert [type(m) for m in lmm.fixed.methods] == [ImageBias, vlmfix.VAR]
    finally:
        lmm.fixed.detach()
