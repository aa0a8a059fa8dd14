"""Chat prompts in a processor's own template: one user turn with its images (or a plain LLaVA-1.5 prompt
where the processor has no template)."""

from __future__ import annotations

from typing import Any


def chat_turn(processor: Any, text: str, images: int = 1, videos: int = 0) -> str:
    """One user turn with `images` images and `videos` videos before `text`, in the processor's chat
    template, ready for generation."""
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


def chat_prompt(processor: Any, question: str, with_image: bool = True) -> str:
    """The model's chat prompt for one user turn (with one image), ready for generation."""
    if getattr(processor, "chat_template", None):
        if with_image:
            return chat_turn(processor, question)
        return processor.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
    return f"USER: <image>\n{question} ASSISTANT:" if with_image else question
