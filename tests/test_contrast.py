"""The contrast-branch capability (vlmfix.core.contrast): branch rows are extra rows of the same forward that
generate never sees and that no method acts on."""

from dataclasses import dataclass

import pytest
import torch

import vlmfix
from tiny import IMAGE, make_batch, make_model, prompts_two, tokenizer
from vlmfix.core.attach import VlmfixError
from vlmfix.core.protocol import CombinesLogits, MethodCall, MethodConfig, Runtime
from vlmfix.methods.registry import register_method, unregister_method
from vlmfix.methods.var import VAR


VAR_TINY = dict(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3))  # with sink dims 0, 1: VAR acts on the tiny models


@dataclass
class Keep(MethodConfig):
    """Runs a no-image branch and keeps the real rows' logits (`seen` collects the branch logits)."""

    mix: float = 0.0


class KeepCall(MethodCall, CombinesLogits):
    def combine(self, logits, branch):
        self.runtime.seen.append(branch.clone())
        return logits + self.runtime.config.mix * branch


class KeepRuntime(Runtime):
    call = KeepCall

    def __init__(self, config, target):
        super().__init__(config, target)
        self.seen = []

    def branches(self):
        return ("no_image",)


@pytest.fixture(autouse=True)
def registered():
    register_method(name="keep_test", config=Keep, runtime=KeepRuntime, listed=False)
    yield
    unregister_method("keep_test")


def greedy(fixed_or_model, batch, steps=4):
    model = fixed_or_model.model if isinstance(fixed_or_model, vlmfix.Attached) else fixed_or_model
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        out = fixed_or_model.generate(**batch, max_new_tokens=steps, do_sample=False, pad_token_id=0,
                                      return_dict_in_generate=True, output_logits=True)
    finally:
        model.generation_config.eos_token_id = eos
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_branch_rows_change_nothing_and_methods_skip_them(family):
    model = make_model(family)
    batch = make_batch(family, model, prompts_two())
    with vlmfix.attach(model, tokenizer(), [VAR(**VAR_TINY)], sink_dims=[0, 1]) as fixed:
        ref_tokens, ref_logits = greedy(fixed, batch)
        ref_summary = fixed.last_state.record(VAR).summary()
        assert any(fixed.last_state.record(VAR).acted())
    with vlmfix.attach(model, tokenizer(), [VAR(**VAR_TINY), Keep()], sink_dims=[0, 1]) as fixed:
        tokens, logits = greedy(fixed, batch)
        state = fixed.last_state
        seen = fixed.runtimes[-1].seen
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert state.batch_size == 2 and state.branch_rows == 2
    assert state.record(VAR).summary() == ref_summary
    assert len(seen) == 4 and seen[0].shape == ref_logits[:, 0].shape


def test_branch_logits_are_the_prompt_without_its_image():
    model = make_model("llava")
    prompts = prompts_two()
    batch = make_batch("llava", model, prompts)
    alone = make_batch("llava", model, [(before, None, after) for before, _, after in prompts])
    assert IMAGE not in alone["input_ids"].tolist()
    with vlmfix.attach(model, tokenizer(), Keep()) as fixed:
        greedy(fixed, batch, steps=1)
        branch = fixed.runtimes[0].seen[0]
    plain = model(**alone).logits[:, -1]
    assert torch.allclose(branch, plain, atol=1e-5)


def test_static_cache_and_two_branching_methods_are_refused():
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    with vlmfix.attach(model, tokenizer(), Keep()) as fixed:
        with pytest.raises(VlmfixError, match="dynamic cache"):
            fixed.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0, cache_implementation="static")
    with pytest.raises(VlmfixError, match="at most one"):
        vlmfix.attach(model, tokenizer(), [Keep(), Keep(mix=1.0)])


def test_a_plain_forward_returns_the_real_rows():
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    plain = model(**batch, output_hidden_states=True)
    with vlmfix.attach(model, tokenizer(), Keep()) as fixed:
        out = fixed(**batch, output_hidden_states=True)
        assert len(fixed.runtimes[0].seen) == 1
    assert out.logits.shape == plain.logits.shape and out.hidden_states[0].shape == plain.hidden_states[0].shape
    assert torch.allclose(out.logits, plain.logits, atol=1e-5)
