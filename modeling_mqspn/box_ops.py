"""Pure box maths. Boxes are ``(x1, y1, x2, y2)`` in image pixels, ``x2 > x1`` and ``y2 > y1``.

Nothing here knows about models: the metric, the VinVL reader, the processor and the region
labelling all use these functions.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "Box",
    "box_area",
    "box_iou",
    "clip_box",
    "is_degenerate",
    "is_finite_box",
    "max_iou",
    "sanitize_boxes",
    "sanitize_scored_boxes",
]

Box = Tuple[float, float, float, float]


def box_area(box: Sequence[float]) -> float:
    """Area of one box; 0 for degenerate boxes."""
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (continuous coordinates, no +1 convention)."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def max_iou(box: Sequence[float], others: Iterable[Sequence[float]]) -> float:
    """The largest IoU between ``box`` and any of ``others`` (0.0 when there are none)."""
    return max((box_iou(box, other) for other in others), default=0.0)


def is_finite_box(box: Sequence[float]) -> bool:
    return len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)


def clip_box(box: Sequence[float], width: float, height: float) -> Box:
    """Clip a box to the image ``[0, width] x [0, height]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (
        min(max(x1, 0.0), float(width)),
        min(max(y1, 0.0), float(height)),
        min(max(x2, 0.0), float(width)),
        min(max(y2, 0.0), float(height)),
    )


def is_degenerate(box: Sequence[float], min_size: float = 1.0) -> bool:
    """True when a box is not finite or is thinner than ``min_size`` pixels in either direction."""
    return not is_finite_box(box) or (box[2] - box[0]) < min_size or (box[3] - box[1]) < min_size


def sanitize_boxes(
    boxes: Iterable[Sequence[float]],
    width: Optional[float] = None,
    height: Optional[float] = None,
    top_k: Optional[int] = None,
    min_size: float = 1.0,
) -> Tuple[List[Box], int]:
    """Clip boxes to the image (when its size is known), drop degenerate and exact duplicate boxes,
    keep the first ``top_k`` (the input order is the detector's score order).

    Returns ``(kept_boxes, num_dropped)``; ``num_dropped`` counts non-finite, degenerate and
    duplicate boxes (not those cut by ``top_k``), so callers can report it.
    """
    kept, _, dropped = sanitize_scored_boxes(boxes, None, width, height, top_k, min_size)
    return kept, dropped


def sanitize_scored_boxes(
    boxes: Sequence[Sequence[float]],
    scores: Optional[Sequence[float]],
    width: Optional[float] = None,
    height: Optional[float] = None,
    top_k: Optional[int] = None,
    min_size: float = 1.0,
    nms_iou: Optional[float] = None,
) -> Tuple[List[Box], List[float], int]:
    """``sanitize_boxes`` for scored detections: sorted by descending score first (ties and
    ``scores=None`` keep the input order; non-finite scores are dropped), then clipped, degenerate and
    exact duplicate boxes dropped, and, with ``nms_iou``, a box dropped when its IoU with a better kept
    box is at least ``nms_iou`` (greedy non-maximum suppression). Keeps the first ``top_k``.

    Returns ``(kept_boxes, kept_scores, num_dropped)``; ``kept_scores`` are the detector's scores, or
    for ``scores=None`` rank scores ``1, (n-1)/n, ...`` (n = boxes kept) that keep the order when a
    reader sorts by score. ``num_dropped`` counts the boxes removed for being non-finite, degenerate,
    duplicate or suppressed (not those cut by ``top_k``).
    """
    boxes = [tuple(float(v) for v in box) for box in boxes]
    if scores is not None:
        scores = [float(s) for s in scores]
        if len(scores) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
        order = sorted(range(len(boxes)), key=lambda i: -scores[i] if math.isfinite(scores[i]) else math.inf)
    else:
        order = list(range(len(boxes)))
    kept: List[Box] = []
    kept_scores: List[float] = []
    seen = set()
    dropped = 0
    for index in order:
        if top_k is not None and len(kept) >= top_k:  # before the first box too: top_k = 0 keeps none
            break
        box = boxes[index]
        if not is_finite_box(box) or (scores is not None and not math.isfinite(scores[index])):
            dropped += 1
            continue
        if width is not None and height is not None:
            box = clip_box(box, width, height)
        if is_degenerate(box, min_size) or box in seen:
            dropped += 1
            continue
        if nms_iou is not None and any(box_iou(box, other) >= nms_iou for other in kept):
            dropped += 1
            continue
        seen.add(box)
        kept.append(box)
        kept_scores.append(scores[index] if scores is not None else 0.0)
    if scores is None:
        kept_scores = [(len(kept) - rank) / len(kept) for rank in range(len(kept))]
    return kept, kept_scores, dropped
