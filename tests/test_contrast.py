"""The contrast-branch capability (vlmfix.core.contrast): branch rows are extra rows of the same forward that
generate never sees and that no method acts on."""

from dataclasses import dataclass

import pytest
import torch

import vlmfix
from tiny import IMAGE, make_batch, make_model, prompts_two, tokenizer
from vlmfix.core.attach import VlmfixError
from vlmfix.core.protocol import BiasesScores, CombinesLogits, MethodCall, MethodConfig, Runtime
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


def test_two_branching_methods_are_refused():
    model = make_model("llava")
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


# -- the "same" kind and calls that act on the branch rows (MethodCall.batch_rows) ---------------------------
@dataclass
class Tilt(MethodConfig):
    """Adds `amount` to the pre-softmax scores of image keys in layer `layer`, on the rows its calls see
    (`rows`: MethodCall.batch_rows); with `branch` a "same" branch whose logits `combine` returns."""

    amount: float = 3.0
    layer: int = 1
    rows: str = "branch"
    branch: bool = True


class TiltCall(MethodCall, BiasesScores, CombinesLogits):
    def __init__(self, runtime, state):
        super().__init__(runtime)
        self.batch_rows = runtime.config.rows
        self.image = state.image_mask()
        self.flags = []

    def queries(self, block, state):
        return range(block.q_len) if block.layer == self.runtime.config.layer else None

    def bias(self, block, state, queries, scores):
        if self.batch_rows == "all":
            self.flags.append(state.branch_flags().clone())
        b, _, _, k = scores.shape
        cols = torch.nn.functional.pad(self.image, (0, k - self.image.shape[1]))
        if cols.shape[0] != b:  # "all": the image columns of the real rows and of their branch rows
            cols = torch.cat([cols, cols])
        allowed = scores > torch.finfo(scores.dtype).min
        return torch.where(cols[:, None, None, :] & allowed, scores + self.runtime.config.amount, scores)

    def combine(self, logits, branch):
        self.runtime.seen.append((logits.clone(), branch.clone()))
        return branch


class TiltRuntime(Runtime):
    call = TiltCall

    def __init__(self, config, target):
        super().__init__(config, target)
        self.seen = []

    def branches(self):
        return ("same",) if self.config.branch else ()

    def start(self, state):
        return TiltCall(self, state)


@pytest.fixture
def tilt():
    register_method(name="tilt_test", config=Tilt, runtime=TiltRuntime, listed=False)
    yield
    unregister_method("tilt_test")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_call_acts_on_the_same_branch_rows_only(family, tilt):
    """A "same" branch whose rows a call biases (batch_rows="branch"): the real rows are the plain model, the branch
    rows are what the same bias gives on the real rows without a branch; generate sees the branch's tokens."""
    model = make_model(family)
    batch = make_batch(family, model, prompts_two())
    plain_tokens, plain_logits = greedy(model, batch)
    with vlmfix.attach(model, tokenizer(), Tilt(rows="real", branch=False)) as fixed:
        biased_tokens, biased_logits = greedy(fixed, batch)
    assert not torch.allclose(biased_logits, plain_logits, atol=1e-3), "the bias must change the logits"
    with vlmfix.attach(model, tokenizer(), Tilt()) as fixed:
        tokens, logits = greedy(fixed, batch)
        seen = fixed.runtimes[0].seen
        state = fixed.last_state
    assert state.branch_rows == 2 and state.batch_size == 2
    assert torch.equal(tokens, biased_tokens)
    assert torch.allclose(logits, biased_logits, atol=1e-5)
    real, branch = seen[0]
    assert torch.allclose(real, plain_logits[:, 0], atol=1e-5)  # the real rows: the plain model
    assert torch.allclose(branch, biased_logits[:, 0], atol=1e-5)


def test_a_call_that_sees_all_rows_gets_the_branch_flags(tilt):
    """batch_rows="all": the call's tensors hold 2B rows and `branch_flags()` marks rows B..2B-1 (a tensor on the
    model's device); biasing every row, both halves are the biased model."""
    model = make_model("llava")
    batch = make_batch("llava", model, prompts_two())
    with vlmfix.attach(model, tokenizer(), Tilt(rows="real", branch=False)) as fixed:
        _, biased_logits = greedy(fixed, batch, steps=2)
    with vlmfix.attach(model, tokenizer(), Tilt(rows="all")) as fixed:
        _, logits = greedy(fixed, batch, steps=2)
        call = fixed.last_state.calls[0]
        real, branch = fixed.runtimes[0].seen[0]
    assert call.flags and call.flags[0].tolist() == [False, False, True, True]
    assert torch.allclose(real, biased_logits[:, 0], atol=1e-5) and torch.allclose(branch, real, atol=1e-5)
    assert torch.allclose(logits, biased_logits, atol=1e-5)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_a_plain_forward_gives_the_same_branch_its_images(family, tilt):
    """model(**inputs) (the pixels reach the forward; generate encodes them before it): the branch rows get the same
    images (per-image inputs doubled), and their logits are the biased model's."""
    model = make_model(family)
    batch = make_batch(family, model, prompts_two())
    with vlmfix.attach(model, tokenizer(), Tilt(rows="real", branch=False)) as fixed:
        biased = fixed(**batch).logits[:, -1]
    with vlmfix.attach(model, tokenizer(), Tilt()) as fixed:
        out = fixed(**batch)
        real, branch = fixed.runtimes[0].seen[0]
    assert out.logits.shape[0] == 2
    assert torch.allclose(branch, biased, atol=1e-5) and torch.allclose(out.logits[:, -1], biased, atol=1e-5)
