"""The demo VLM's prompts: the caption requests and POPE's yes/no question (LLaVA-1.5's POPE format),
shared by the training recipe and the held-out check."""

from __future__ import annotations

from vlmfix.data.english import indefinite

POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPTS = (
    "Please describe this image in detail.",
    "Describe the image.",
    "What is in this picture?",
    "Write a short caption for this image.",
    "What do you see in the image?",
)


def yes_no_question(name: str) -> str:
    """POPE's question for a category, with the answer-format suffix of LLaVA-1.5's POPE prompt."""
    return f"Is there {indefinite(name)} in the image?{POPE_SUFFIX}"
