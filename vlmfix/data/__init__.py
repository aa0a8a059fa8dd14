"""Data layer: COCO-format annotations, POPE question files, and the EmojiCOCO world.

    from vlmfix.data import build_pope, load_pope_jsonl, generate_world
"""

from vlmfix.data.coco import image_categories, load_captions, load_instances
from vlmfix.data.errors import DataFormatError
from vlmfix.data.pope import PopeQuestion, build_pope, load_pope_hf, load_pope_jsonl, write_pope_jsonl
from vlmfix.data.world import generate_world

__all__ = [
    "DataFormatError",
    "PopeQuestion",
    "build_pope",
    "generate_world",
    "image_categories",
    "load_captions",
    "load_instances",
    "load_pope_hf",
    "load_pope_jsonl",
    "write_pope_jsonl",
]
