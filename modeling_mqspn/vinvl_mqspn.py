"""VinVL detection files: the candidate regions of the GMNER releases (paper §4.1; docs/DESIGN.md §6;
docs/DESIGN.md §10.3).

A release ships one ``<IMGID>.jpg.npz`` per image, a numpy archive with

* ``num_boxes`` — integer scalar N (the rows of ``bounding_boxes`` that are real);
* ``bounding_boxes`` — (N, 4) float, absolute pixel ``x1, y1, x2, y2`` in the original image;
* ``scores`` — (N,) float detector scores, optional;
* ``box_features`` — (N, D) float region features (D = 2048 for VinVL), optional.

``load_vinvl_proposals`` turns one file into the top-k proposals the model sees: detector order
(sorted by descending score when scores are present), clipped to the image when its size is known,
non-finite, degenerate (thinner than 1 pixel) and exact duplicate boxes dropped and counted.
Archives are opened with ``allow_pickle=False``: object arrays (e.g. the ``objects`` class names of
some dumps) are never unpickled.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np

from .box_ops import clip_box, is_degenerate, is_finite_box
from .configuration_mqspn import DEFAULT_MAX_REGIONS

__all__ = ["REQUIRED_KEYS", "VinVLProposals", "load_vinvl_proposals", "vinvl_file"]

REQUIRED_KEYS = ("num_boxes", "bounding_boxes")


def _read_array(archive, key: str, path: str, dtype) -> np.ndarray:
    try:
        return np.asarray(archive[key], dtype=dtype)
    except (ValueError, TypeError) as error:  # object arrays (pickles) are refused, strings fail dtype
        raise ValueError(f"{path}: key '{key}' is not a numeric array ({error})") from None


@dataclass
class VinVLProposals:
    """Top-k proposals of one image.

    Attributes:
        boxes: (k', 4) float32, pixel ``x1, y1, x2, y2`` in proposal order, k' <= top_k.
        box_features: (k', D) float32 features of those boxes, or None when the file has none.
        scores: (k',) float32 detector scores, or None when the file has none.
        num_read: N, the boxes the file declares.
        dropped: counts of boxes removed: ``{"non_finite", "degenerate", "duplicate"}``.
        num_clipped: kept boxes that were changed by clipping to the image.
    """

    boxes: np.ndarray
    box_features: Optional[np.ndarray]
    scores: Optional[np.ndarray]
    num_read: int
    dropped: Dict[str, int] = field(default_factory=dict)
    num_clipped: int = 0


def vinvl_file(vinvl_dir: str, image_id: str) -> str:
    """The detection file of image ``image_id`` (``<IMGID>.jpg.npz``) inside ``vinvl_dir``."""
    return os.path.join(vinvl_dir, f"{image_id}.jpg.npz")


def load_vinvl_proposals(
    path: str,
    top_k: int = DEFAULT_MAX_REGIONS,
    image_size: Optional[Sequence[int]] = None,
) -> VinVLProposals:
    """Read one VinVL ``.npz`` file and keep its first ``top_k`` valid proposals.

    Args:
        path: the ``<IMGID>.jpg.npz`` file.
        top_k: k, the most proposals kept (docs/DESIGN.md §9: 18).
        image_size: ``(width, height)`` of the image; boxes are clipped to it when given.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an npz archive, lacks ``num_boxes`` / ``bounding_boxes``, or
            its arrays have inconsistent shapes (the message names the file and the key).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: VinVL detection file not found") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # EOFError: an empty file
        raise ValueError(f"{path}: not a readable numpy .npz archive ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive with named arrays, found a single array")
    with archive:
        for key in REQUIRED_KEYS:
            if key not in archive.files:
                raise ValueError(
                    f"{path}: missing key '{key}' (found {sorted(archive.files)}); a VinVL detection "
                    "file needs 'num_boxes' and 'bounding_boxes'"
                )
        num_boxes = _read_array(archive, "num_boxes", path, np.float64)
        if num_boxes.size != 1 or not np.isfinite(num_boxes).all() or num_boxes.item() % 1:
            raise ValueError(f"{path}: key 'num_boxes' must be an integer scalar, got {num_boxes!r}")
        num_boxes = int(num_boxes.item())
        boxes = _read_array(archive, "bounding_boxes", path, np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{path}: key 'bounding_boxes' must have shape (N, 4), got {boxes.shape}")
        if not 0 <= num_boxes <= boxes.shape[0]:
            raise ValueError(
                f"{path}: key 'num_boxes' is {num_boxes} but 'bounding_boxes' has {boxes.shape[0]} rows"
            )
        boxes = boxes[:num_boxes]
        scores = features = None
        if "scores" in archive.files:
            scores = _read_array(archive, "scores", path, np.float64).reshape(-1)
            if scores.shape[0] < num_boxes:
                raise ValueError(f"{path}: key 'scores' has {scores.shape[0]} values for {num_boxes} boxes")
            scores = scores[:num_boxes]
        if "box_features" in archive.files:
            features = _read_array(archive, "box_features", path, np.float32)
            if features.ndim != 2 or features.shape[0] < num_boxes:
                raise ValueError(
                    f"{path}: key 'box_features' must have shape (N, D) with N >= {num_boxes}, "
                    f"got {features.shape}"
                )
            features = features[:num_boxes]

    order = np.arange(num_boxes)
    if scores is not None:
        # Descending score, ties in file order; non-finite scores sort last (their boxes are dropped).
        order = np.argsort(-np.nan_to_num(scores, nan=-np.inf, posinf=-np.inf), kind="stable")

    dropped = {"non_finite": 0, "degenerate": 0, "duplicate": 0}
    kept, seen, num_clipped = [], set(), 0
    for index in order:
        if len(kept) >= top_k:
            break
        box = tuple(float(v) for v in boxes[index])
        if not is_finite_box(box) or (scores is not None and not np.isfinite(scores[index])):
            dropped["non_finite"] += 1
            continue
        clipped = box if image_size is None else clip_box(box, image_size[0], image_size[1])
        if is_degenerate(clipped):
            dropped["degenerate"] += 1
            continue
        if clipped in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(clipped)
        num_clipped += clipped != box
        kept.append((int(index), clipped))

    indices = [index for index, _ in kept]
    return VinVLProposals(
        boxes=np.asarray([box for _, box in kept], dtype=np.float32).reshape(-1, 4),
        box_features=None if features is None else features[indices],
        scores=None if scores is None else scores[indices].astype(np.float32),
        num_read=num_boxes,
        dropped=dropped,
        num_clipped=num_clipped,
    )
