"""Every Python block of README.md runs as written, in order, in one Python session (as the README
says above its first block), from a fresh working folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_promised_first_block():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 6
    first = blocks[0].splitlines()
    assert first[0] == "import vlmfix" and first[1].startswith("model, processor = vlmfix.load_demo()")
    assert "processor.apply_chat_template" in blocks[0]


@pytest.mark.smollm2
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    from vlmfix.methods import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry.methods()))  # what the README registers stays in it
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(python_blocks(README.read_text()), 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec", dont_inherit=True), namespace)
        except Exception as err:  # the block and its error, to fix the README rather than the test
            pytest.fail(f"README python block {number} fails: {type(err).__name__}: {err}\n{block}")
    out = capsys.readouterr().out
    assert "A picture of" in out  # the first block's caption of the showcase scene
    assert not namespace["model"].config.get_text_config()._attn_implementation.startswith("vlmfix")  # all detached
