import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import FAMILIES, make_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_vl"])
def family_model(request):
    """(family, tiny random model) of the three families the method tests run on, built once per test module."""
    return request.param, make_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """(LlamaForCausalLM, tokenizer) of the real SmolLM2-135M-Instruct (converted once, cached)."""
    from vlmfix.demo import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smol_llava(smollm2):
    """LLaVA-1.5-style model on SmolLM2 with a random 576-token vision tower, and its processor."""
    from vlmfix.demo import build_llava

    lm, tok = smollm2
    return build_llava(lm, tok)


@pytest.fixture(scope="session")
def small_smol_llava(smollm2):
    """The same with 144 image tokens (12 x 12), for faster generate tests."""
    from vlmfix.demo import build_llava

    lm, tok = smollm2
    return build_llava(lm, tok, image_size=168)


@pytest.fixture
def smol_pair(small_smol_llava):
    """(model, processor, texts, images, inputs): two chat prompts, a question and a request for a description,
    with a wide and a tall image, left-padded into one batch (the tests plant sinks at its positions)."""
    from PIL import Image

    from vlmfix.demo.assemble import prompt_for

    model, processor = small_smol_llava
    processor.tokenizer.padding_side = "left"
    texts = [prompt_for("Is there a red bicycle near the tree?"), prompt_for("Describe this picture in detail.")]
    images = [Image.new("RGB", (80, 60), "blue"), Image.new("RGB", (50, 90), "green")]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return model, processor, texts, images, dict(inputs)


@pytest.fixture
def smol_one(smol_pair):
    """(model, processor, inputs): smol_pair's first prompt alone, unpadded (what the slow references take)."""
    model, processor, _, _, inputs = smol_pair
    pad = int((inputs["attention_mask"][0] == 0).sum())
    one = {k: v[:1, pad:] if k in ("input_ids", "attention_mask") else v[:1] for k, v in inputs.items()}
    return model, processor, one


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """Each supported family in turn."""
    return request.param


@pytest.fixture(scope="module")
def model(family):
    """A tiny random model of `family`, shared by the tests of one module."""
    return make_model(family)
