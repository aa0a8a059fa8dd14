"""Tiny random models of the families added in issue 13, one module each (the protocol every module
follows is in tests/families/common.py; tests/test_families.py runs the acceptance checks on each)."""

#: the family test modules tests/test_families.py runs (each helper adds its own names)
MODULES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "mistral3", "gemma3", "llava_onevision",
                             "internvl", "idefics3", "smolvlm")
