"""Method configs check their fields when constructed (issue 19): types and ranges, one message per
mistake, nothing truncated or coerced; presets and the CLI's method sets still build valid configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from tiny import make_model, tokenizer

import vlmfix
from vlmfix.methods import build, methods, parse_methods
from vlmfix.core.presets import configs_dir

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("cls, kwargs, message", [
    # VAR
    (vlmfix.VAR, dict(layers=(1.7,)), "layers must hold integer layer indices, got 1.7"),
    (vlmfix.VAR, dict(layers=()), "layers is empty"),
    (vlmfix.VAR, dict(layers=(True, 2)), "integer layer indices, got True"),
    (vlmfix.VAR, dict(layers=5), "must be a list"),
    (vlmfix.VAR, dict(layers="2"), "must be a list"),
    (vlmfix.VAR, dict(layers=(2, 2)), "more than once"),
    (vlmfix.VAR, dict(layers=(-1,)), ">= 0"),
    (vlmfix.VAR, dict(p=NAN), "p must be a finite number in \\[0, 1\\]"),
    (vlmfix.VAR, dict(rho=1.5), "rho must be in \\[0, 1\\], got 1.5"),
    (vlmfix.VAR, dict(m_min=True), "m_min must be a finite number"),
    (vlmfix.VAR, dict(sources="text"), "sources must be one of 'all', 'visual'"),
    (vlmfix.VAR, dict(tau=INF), "tau must be"),
    (vlmfix.VAR, dict(tau=0), "tau must be a finite number > 0"),
    (vlmfix.VAR, dict(tau="bos:2"), "tau must be"),
    (vlmfix.VAR, dict(tau="inf"), "tau must be a finite number > 0"),
    # GIFT
    (vlmfix.GIFT, dict(saliency_layers=(0.5,)), "saliency_layers must hold integer layer indices"),
    (vlmfix.GIFT, dict(boost_layers=[]), "boost_layers is empty"),
    (vlmfix.GIFT, dict(beta=-5), "beta must be >= 0, got -5"),
    (vlmfix.GIFT, dict(beta=INF), "beta must be a finite number"),
    (vlmfix.GIFT, dict(alpha=INF), "alpha must be a finite number in \\[0, 1e\\+30\\], got inf"),
    (vlmfix.GIFT, dict(alpha=NAN), "alpha must be a finite number"),
    (vlmfix.GIFT, dict(alpha=-1.0), "alpha must be in \\[0, 1e\\+30\\]"),
    (vlmfix.GIFT, dict(alpha=1e31), "alpha must be in \\[0, 1e\\+30\\]"),
    (vlmfix.GIFT, dict(alpha="5"), "alpha must be a finite number"),
    (vlmfix.GIFT, dict(use_spacy="yes"), "use_spacy must be one of None, True, False"),
    # FastVPrune
    (vlmfix.FastVPrune, dict(layer=2.5), "layer must be an int, got 2.5"),
    (vlmfix.FastVPrune, dict(layer=True), "layer must be an int, got True"),
    (vlmfix.FastVPrune, dict(layer=0), "layer 0 is out of range"),
    (vlmfix.FastVPrune, dict(keep=True), "keep must be a positive number of tokens"),
    (vlmfix.FastVPrune, dict(keep=128.0), "keep must be a positive number of tokens"),
    (vlmfix.FastVPrune, dict(keep=0), "keep must be a positive number of tokens"),
    (vlmfix.FastVPrune, dict(keep_ratio=NAN), "keep_ratio must be a finite number in \\(0, 1\\]"),
    (vlmfix.FastVPrune, dict(keep=64, keep_ratio=0.5), "not both"),
    (vlmfix.FastVPrune, dict(form="drop"), "form must be one of 'inplace', 'mask'"),
    (vlmfix.FastVPrune, dict(debias="yes"), "debias must be a vlmfix.Debias"),
    (vlmfix.FastVPrune, dict(debias={"position": "linear"}), "not a valid Debias.*position"),
    # StagedPrune
    (vlmfix.StagedPrune, dict(layers=(), keep_ratios=()), "layers is empty"),
    (vlmfix.StagedPrune, dict(layers=(2.0, 4.0), keep_ratios=(0.5, 0.25)), "integer layer indices"),
    (vlmfix.StagedPrune, dict(layers=(0, 2), keep_ratios=(0.5, 0.25)), "layers must be >= 1"),
    (vlmfix.StagedPrune, dict(layers=(2, 1), keep_ratios=(0.5, 0.25)), "strictly increasing"),
    (vlmfix.StagedPrune, dict(layers=(1, 2), keep_ratios=(0.5,)), "one keep ratio per layer"),
    (vlmfix.StagedPrune, dict(layers=(1, 2), keep_ratios=(0.5, INF)), "keep ratio must be a finite number"),
    (vlmfix.StagedPrune, dict(layers=(1, 2), keep_ratios=(0.3, 0.5)), "strictly decreasing"),
    (vlmfix.StagedPrune, dict(layers=(1, 2), keep_ratios=0.5), "keep_ratios must be a list"),
    # Debias, SinkShare
    (vlmfix.Debias, dict(position="linear"), "position must be one of 'exp', 'cubic', None"),
    (vlmfix.Debias, dict(padding="no"), "padding must be one of True, False"),
    (vlmfix.Debias, dict(padding_threshold=NAN), "padding_threshold must be a finite number"),
    (vlmfix.Debias, dict(trend={"family": "exp", "mu": 1.0}), "lacks the key.*sigma"),
    (vlmfix.Debias, dict(trend=3.0), "trend must be a Trend"),
    (vlmfix.SinkShare, dict(tau=-1.0), "tau must be a finite number > 0"),
    (vlmfix.SinkShare, dict(tau=True), "tau must be None, a finite number"),
])
def test_a_bad_field_is_refused_at_construction(cls, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        cls(**kwargs)
    assert str(err.value).startswith(f"{cls.__name__}: ")  # one mistake, one message


def test_every_mistake_is_named():
    with pytest.raises(ValueError) as err:
        vlmfix.VAR(p=2.0, rho=-1.0, sources="text", layers=(1.5,))
    text = str(err.value)
    assert text.startswith("VAR has 4 mistakes: ")
    for part in ("rho must be in [0, 1], got -1.0", "p must be in [0, 1], got 2.0", "sources must be one of",
                 "layers must hold integer layer indices, got 1.5"):
        assert part in text
    with pytest.raises(ValueError, match="GIFT has 3 mistakes: alpha .*; saliency_layers .*; beta "):
        vlmfix.GIFT(alpha=INF, saliency_layers=(0.5,), beta=-5)


def test_valid_configs_build_and_are_kept_as_given():
    """Presets and the CLI's method sets build valid configs (an invalid override is refused); numpy integers
    are layer indices and ints numbers, kept as given; a layer beyond the model is refused when bound."""
    for name, entry in methods().items():
        path = configs_dir() / "methods" / f"{name}.yaml"
        if not path.is_file():
            continue
        data = yaml.safe_load(path.read_text())
        for preset in data["presets"]:
            assert isinstance(build(name, preset), entry.config)
    debiased = build("fastv", "quarter-debiased")
    assert isinstance(debiased.debias, vlmfix.Debias) and debiased.debias.position == "exp"
    assert [type(m) for m in parse_methods("var:general,gift:mild,fastv:keep64")] == [
        vlmfix.VAR, vlmfix.GIFT, vlmfix.FastVPrune]
    with pytest.raises(ValueError, match="GIFT: alpha must be"):
        build("gift", "mild", alpha=INF)

    layers = [np.int64(2), 3]
    var = vlmfix.VAR(layers=layers, p=1, tau="scaled")
    assert var.layers is layers and var.p == 1
    gift = vlmfix.GIFT(alpha=0, saliency_layers=(np.int32(1),), boost_layers=range(2, 4), beta=0.0)
    staged = vlmfix.StagedPrune(layers=np.array([1, 3]), keep_ratios=(0.5, np.float32(0.25)))
    fastv = vlmfix.FastVPrune(layer=np.int64(1), keep=np.int64(5))
    model = make_model("llava")  # 4 decoder layers
    with vlmfix.attach(model, None, var, sink_dims=[0]) as fixed:
        assert fixed.runtimes[0].layers == (2, 3)
    for method in (staged, fastv):
        with vlmfix.attach(model, None, method) as fixed:
            assert fixed.runtimes[0].layers == tuple(method.stage_layers())
    with vlmfix.attach(model, tokenizer(), gift) as fixed:
        assert fixed.runtimes[0].saliency_layers == (1,) and fixed.runtimes[0].boost_layers == (2, 3)
    with pytest.raises(ValueError, match="outside the model's 4 decoder layers"):
        vlmfix.attach(model, None, vlmfix.VAR(layers=(9,)), sink_dims=[0])  # valid data, wrong for this model
