"""Drawing grounded entities on their image with PIL (the PNGs of ``examples/predict.py``, the demo and
the Space).

``draw_entities(image, entities)`` takes the entity dicts of docs/DESIGN.md §7 (``text``, ``type``, ``box`` in
pixels or None, optional ``score``) and returns a new image: each grounded entity's box in its type's
colour with a label ``text (TYPE)``; when some entities have no box (not groundable), a footer band
below the picture lists them, so every prediction is visible in the picture.
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from .schema_mqspn import parse_box

__all__ = ["FOOTER_COLOR", "PALETTE", "TYPE_COLORS", "draw_entities", "entity_label", "type_color"]

# The four Twitter-GMNER types get fixed, well-separated colours; other types (Twitter-FMNERG's) one
# of PALETTE chosen by a stable hash of the name.
TYPE_COLORS: Dict[str, Tuple[int, int, int]] = {
    "PER": (230, 25, 75),
    "LOC": (0, 130, 200),
    "ORG": (60, 180, 75),
    "OTHER": (245, 130, 48),
}
PALETTE: List[Tuple[int, int, int]] = [
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (170, 110, 40),
    (128, 0, 0),
    (0, 128, 128),
    (128, 128, 0),
    (0, 0, 128),
]
FOOTER_COLOR = (245, 245, 245)


def type_color(entity_type: str) -> Tuple[int, int, int]:
    """The RGB colour of an entity type (fixed for PER/LOC/ORG/OTHER, else a stable palette entry)."""
    if entity_type in TYPE_COLORS:
        return TYPE_COLORS[entity_type]
    return PALETTE[zlib.crc32(entity_type.encode("utf-8")) % len(PALETTE)]


def entity_label(entity: dict) -> str:
    """``text (TYPE)``, the label drawn for an entity."""
    return f"{entity.get('text', '')} ({entity['type']})"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> List[str]:
    """Greedy word wrapping of ``text`` into lines at most ``width`` pixels wide (a single word wider
    than ``width`` gets a line of its own)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def draw_entities(image: Image.Image, entities: Sequence[dict]) -> Image.Image:
    """Draw each grounded entity's box and label on a copy of ``image``.

    Args:
        image: the tweet's image (PIL; any mode, drawn in RGB).
        entities: dicts with ``type`` and ``box`` (pixel ``[x1, y1, x2, y2]`` or None), and ``text``.

    Returns:
        A new RGB image: the picture with one rectangle + label per entity with a box, and, when any
        entity has no box, a footer band "not in the image: text (TYPE), ..." below it (the returned
        image is then taller than ``image``).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"draw_entities takes a PIL image, got {type(image).__name__}")
    picture = image.convert("RGB")
    width, height = picture.size
    line_width = max(2, round(min(width, height) / 150))
    font = _font(max(12, round(min(width, height) / 28)))

    grounded = [entity for entity in entities if entity.get("box") is not None]
    ungrounded = [entity for entity in entities if entity.get("box") is None]

    draw = ImageDraw.Draw(picture)
    labels_at: Dict[Tuple[float, ...], int] = {}  # entities sharing a box stack their labels downwards
    for entity in grounded:
        box = list(parse_box(entity["box"], f"entity {entity_label(entity)!r}"))
        color = type_color(entity["type"])
        draw.rectangle(box, outline=color, width=line_width)
        label = entity_label(entity)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left, bottom - top
        pad = max(2, line_width)
        # Above the box when there is room, else just inside its top edge; later labels of the same box below.
        y = box[1] - text_h - 2 * pad if box[1] - text_h - 2 * pad >= 0 else box[1]
        stacked = labels_at.get(tuple(box), 0)
        labels_at[tuple(box)] = stacked + 1
        y += stacked * (text_h + 2 * pad)
        x = min(max(0.0, box[0]), max(0.0, width - text_w - 2 * pad))
        draw.rectangle([x, y, x + text_w + 2 * pad, y + text_h + 2 * pad], fill=color)
        draw.text((x + pad - left, y + pad - top), label, fill=(255, 255, 255), font=font)

    if not ungrounded:
        return picture

    footer_text = "not in the image: " + ", ".join(entity_label(entity) for entity in ungrounded)
    lines = _wrap(draw, footer_text, font, width - 16)
    left, top, right, bottom = draw.textbbox((0, 0), "Ag", font=font)
    line_h = (bottom - top) + 6
    canvas = Image.new("RGB", (width, height + line_h * len(lines) + 12), FOOTER_COLOR)
    canvas.paste(picture, (0, 0))
    footer = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        footer.text((8, height + 6 + number * line_h - top), line, fill=(20, 20, 20), font=font)
    return canvas
