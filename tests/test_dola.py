"""DoLa (transformers' `dola_layers`) with vlmfix attached: transformers 5 no longer has it in-tree (generate loads
it from the Hub as remote code), so `Attached.generate` refuses it with a message that says why and what to do."""

import pytest
import torch

import vlmfix
from test_pai import AFTER, BEFORE
from tiny import make_batch, make_model, tokenizer
from vlmfix.core.attach import VlmfixError
from vlmfix.methods.m3id import M3ID
from vlmfix.methods.vaf import VAF


@pytest.fixture(scope="module")
def model_batch():
    model = make_model("llava")
    return model, make_batch("llava", model, [(BEFORE, (60, 90), AFTER)])


def test_transformers_no_longer_runs_dola_in_tree(model_batch):
    """The plain model: generate asks for the Hub repo's remote code (offline, nothing else runs). Should
    transformers bring DoLa back in-tree this fails, and the refusal below is to be revisited."""
    model, batch = model_batch
    with pytest.raises(ValueError, match="transformers-community/dola"):
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0, dola_layers="high")


@pytest.mark.parametrize("methods", [[VAF()], [M3ID()], [vlmfix.VAR(), vlmfix.GIFT()]], ids=["vaf", "m3id", "var+gift"])
def test_attached_generate_refuses_dola(model_batch, methods):
    model, batch = model_batch
    with vlmfix.attach(model, tokenizer(), methods) as fixed:
        for how in ({"dola_layers": "high", "trust_remote_code": True},
                    {"generation_config": type(model.generation_config)(dola_layers=[1, 2], max_new_tokens=2)}):
            with pytest.raises(VlmfixError, match="DoLa .* not part of transformers 5.*detach first"):
                fixed.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0, **how)
        tokens = fixed.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=0)  # still usable
    assert tokens.shape == (1, batch["input_ids"].shape[1] + 2) and torch.is_tensor(tokens)
