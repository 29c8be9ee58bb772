"""The values every part of the package exchanges — boxes, spans, entities — checked in one place, so the
dataset readers, the metric, the processor, the pipeline, the proposers and the drawing code accept and
refuse the same inputs with the same words (docs/ARCHITECTURE.md, "Dataset rows" and "Evaluation JSONL").

Conventions: a box is pixel `[x1, y1, x2, y2]` of four finite numbers; a span is `(start, end)` word
indices with an inclusive end, `0 <= start <= end < number of words`; an entity is a mapping with
`start`, `end`, `type` and its region (`boxes`, a list of boxes, in gold data; `box`, one box or None,
in predictions). Every error starts with `where` (a file and line, or a sample id and entity number),
so the message says where the bad value is.
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Box", "as_box_list", "is_index", "is_number", "parse_box", "parse_entity", "parse_span"]

Box = Tuple[float, float, float, float]


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool (JSON `true` would otherwise pass as 1)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def is_index(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def parse_box(value: Any, where: str) -> Box:
    """One box as a tuple of floats; `ValueError` unless it is 4 finite numbers."""
    if not (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 4 and all(map(is_number, value))):
        raise ValueError(f"{where}: a box must be [x1, y1, x2, y2] of 4 finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def as_box_list(boxes: Any, where: str) -> List[Tuple[float, ...]]:
    """Candidate boxes (a list, numpy array or torch tensor of shape (N, 4)) as a list of 4-tuples. Only the
    shape is checked: non-finite and degenerate rows are left to `box_ops.sanitize_boxes`, which drops and
    counts them."""
    if hasattr(boxes, "detach"):  # a torch tensor
        boxes = boxes.detach().cpu().numpy()
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: boxes must be a list of [x1, y1, x2, y2] pixel boxes, got {boxes!r}") from None
    if array.size == 0:
        return []
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be a list of [x1, y1, x2, y2] pixel boxes, got shape {array.shape}")
    return [tuple(float(v) for v in row) for row in array]


def parse_span(start: Any, end: Any, where: str, num_words: Optional[int] = None) -> Tuple[int, int]:
    """`(start, end)` word indices, inclusive end; `ValueError` unless `0 <= start <= end (< num_words)`."""
    limit = "" if num_words is None else f" < {num_words}"
    if not (is_index(start) and is_index(end) and 0 <= start <= end and (num_words is None or end < num_words)):
        raise ValueError(
            f"{where}: start/end must be word indices with 0 <= start <= end{limit} (inclusive end), "
            f"got {start!r}, {end!r}"
        )
    return int(start), int(end)


def parse_entity(
    entity: Any,
    where: str,
    region: str = "boxes",
    num_words: Optional[int] = None,
    entity_types: Optional[Sequence[str]] = None,
    require_region: bool = False,
) -> Mapping[str, Any]:
    """One entity → `{"start", "end", "type", region}` with its region parsed: `region="boxes"` (gold: a list of
    boxes; absent or None = not groundable unless `require_region`) or `"box"` (a prediction: one box or
    None). `entity_types` (when given) is the label space the type must belong to."""
    if not isinstance(entity, Mapping):
        raise ValueError(f"{where}: an entity must be an object with 'start', 'end' and 'type', got {entity!r}")
    hints = {"box": " (use null for no region)", "boxes": " (use [] when not groundable)"}
    for key in ("start", "end", "type") + ((region,) if require_region else ()):
        if key not in entity:
            raise ValueError(f"{where}: entity {entity!r} has no '{key}'{hints.get(key, '')}")
    start, end = parse_span(entity["start"], entity["end"], where, num_words)
    entity_type = entity["type"]
    if not isinstance(entity_type, str) or not entity_type:
        raise ValueError(f"{where}: 'type' must be a non-empty string, got {entity_type!r}")
    if entity_types is not None and entity_type not in entity_types:
        raise ValueError(f"{where}: unknown entity type {entity_type!r}; the label space is {list(entity_types)}")
    value = entity.get(region)
    if region == "box":
        parsed = None if value is None else parse_box(value, where)
    else:
        if value is not None and not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: 'boxes' must be a list of [x1, y1, x2, y2], got {value!r}")
        parsed = [parse_box(box, where) for box in (value or [])]
    return {"start": start, "end": end, "type": entity_type, region: parsed}
