"""Region proposers: candidate boxes for a new image (docs/DESIGN.md §6; paper §4.1 uses VinVL top-k).

Every proposer has one method, ``propose(image) -> boxes``: up to ``top_k`` boxes ``[x1, y1, x2, y2]``
in the image's pixels, best first, clipped to the image, with degenerate (thinner than one pixel) and
exact duplicate boxes dropped (``box_ops.sanitize_boxes``); ``num_dropped`` counts the boxes dropped so
far. ``MQSPNProcessor(boxes=proposer)`` and the ``grounded-ner`` pipeline take any object with that
method. The four kinds, chosen by name with ``get_proposer``:

* ``"vinvl"`` (:class:`VinVLProposer`): the VinVL detection files of the GMNER releases
  (``<IMGID>.jpg.npz``), looked up by the image's file name — the regions the paper trains on.
* ``"boxes"`` (:class:`GivenBoxesProposer`): boxes the caller already has.
* ``"detector"`` (:class:`DetectorProposer`): any transformers object detector
  (``AutoModelForObjectDetection`` + its image processor's ``post_process_object_detection``), used
  class-agnostically: every detection is a candidate whatever its class, the top-k by score are kept.
* ``"selective-search"`` (:class:`SelectiveSearchProposer`): OpenCV's selective search, which needs no
  weights and no download (the optional extra ``pip install opencv-contrib-python-headless``), so a user
  with only an MQSPN checkpoint can still run it on a new photo.

``image`` is a path (str or ``os.PathLike``), a PIL image, an HWC uint8 numpy array, an ``http(s)`` URL
or a base64 string; it is read by ``image_utils.load_rgb_image`` (EXIF orientation applied), the loader
the processor and the feature cache use too, so the boxes fit the image the processor crops.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .box_ops import box_iou, sanitize_boxes
from .configuration_mqspn import DEFAULT_MAX_REGIONS
from .image_utils import load_rgb_image
from .schema_mqspn import as_box_list
from .vinvl_mqspn import load_vinvl_proposals, vinvl_file

__all__ = [
    "DetectorProposer",
    "GivenBoxesProposer",
    "PROPOSER_NAMES",
    "RegionProposer",
    "SelectiveSearchProposer",
    "VinVLProposer",
    "get_proposer",
    "selective_search_available",
]

PROPOSER_NAMES = ("vinvl", "boxes", "detector", "selective-search")


class RegionProposer:
    """Base class: ``propose(image)`` reads the image, asks ``_raw_boxes`` for boxes best first, and
    keeps the first ``top_k`` valid ones (clipped, non-degenerate, no exact duplicates).

    Args:
        top_k: k, the most boxes returned (the model's ``max_regions``; paper: 18).
    """

    def __init__(self, top_k: int = DEFAULT_MAX_REGIONS):
        if int(top_k) < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.top_k = int(top_k)
        self.num_dropped = 0

    def propose(self, image) -> List[List[float]]:
        """Up to ``top_k`` pixel boxes ``[x1, y1, x2, y2]`` for ``image``, best first."""
        pil = load_rgb_image(image)
        width, height = pil.size
        raw = self._raw_boxes(image, pil)
        kept, dropped = sanitize_boxes(raw, width, height, top_k=self.top_k)
        self.num_dropped += dropped
        return [list(box) for box in kept]

    def _raw_boxes(self, image, pil: Image.Image) -> Sequence[Sequence[float]]:
        """Candidate boxes best first; ``image`` is the input as given, ``pil`` the image read from it."""
        raise NotImplementedError(f"{type(self).__name__} must implement _raw_boxes(image, pil)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(top_k={self.top_k})"


class GivenBoxesProposer(RegionProposer):
    """The caller's boxes (pixel ``x1, y1, x2, y2``, best first) for every image, clipped to each.

    For per-image boxes give them with each input instead (``{"boxes": [...]}`` in the pipeline).
    """

    def __init__(self, boxes: Sequence[Sequence[float]], top_k: int = DEFAULT_MAX_REGIONS):
        super().__init__(top_k)
        self.boxes = [list(box) for box in as_box_list(boxes, "GivenBoxesProposer")]

    def _raw_boxes(self, image, pil):
        return self.boxes


class VinVLProposer(RegionProposer):
    """VinVL detections of the GMNER releases: ``<directory>/<IMGID>.jpg.npz`` for image ``IMGID.jpg``
    (docs/DESIGN.md §10.3), read by ``vinvl_mqspn.load_vinvl_proposals`` (descending score).

    The file is found from the image's file name, so give the image as a path (or a PIL image opened
    from a file, which keeps its ``filename``).
    """

    def __init__(self, directory: str, top_k: int = DEFAULT_MAX_REGIONS):
        super().__init__(top_k)
        if not os.path.isdir(directory):
            raise ValueError(f"VinVL directory {directory!r} does not exist (it holds the <IMGID>.jpg.npz files)")
        self.directory = os.fspath(directory)

    def _raw_boxes(self, image, pil):
        path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "")
        if not path:
            raise ValueError(
                "VinVLProposer finds an image's detection file by the image's file name: give the image as a "
                "path, not as pixels"
            )
        image_id = os.path.basename(path).split(".")[0]
        found = load_vinvl_proposals(vinvl_file(self.directory, image_id), top_k=self.top_k, image_size=pil.size)
        self.num_dropped += sum(found.dropped.values())
        return found.boxes.tolist()

    def __repr__(self) -> str:
        return f"VinVLProposer(directory={self.directory!r}, top_k={self.top_k})"


class DetectorProposer(RegionProposer):
    """Class-agnostic top-k boxes of a transformers object detector.

    The detector's own ``post_process_object_detection`` turns its outputs into pixel boxes and scores
    (each detector family's box format and score rule stay its own); the class labels are ignored and
    the boxes sorted by descending score.

    Args:
        model: an ``AutoModelForObjectDetection`` instance, or a folder / Hub name to load one from.
        image_processor: its image processor; loaded from ``model`` when that is a name.
        top_k: the most boxes returned.
        threshold: the lowest detection score kept (0.0 keeps every detection; the top-k cut then
            decides).
        device: where the detector runs (default: where it already is).
    """

    def __init__(self, model, image_processor=None, top_k: int = DEFAULT_MAX_REGIONS, threshold: float = 0.0, device=None):
        super().__init__(top_k)
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoImageProcessor, AutoModelForObjectDetection

            name = os.fspath(model)
            model = AutoModelForObjectDetection.from_pretrained(name)
            if image_processor is None:
                image_processor = AutoImageProcessor.from_pretrained(name)
        if image_processor is None:
            raise ValueError("DetectorProposer needs the detector's image_processor when given a model object")
        if not hasattr(image_processor, "post_process_object_detection"):
            raise ValueError(
                f"{type(image_processor).__name__} has no post_process_object_detection; give the image processor of "
                "an object detector (DETR, Conditional/Deformable DETR, YOLOS, RT-DETR, ...)"
            )
        self.model = model.eval() if device is None else model.to(device).eval()
        self.image_processor = image_processor
        self.threshold = float(threshold)

    @torch.no_grad()
    def _raw_boxes(self, image, pil):
        inputs = self.image_processor(images=pil, return_tensors="pt").to(self.model.device)
        outputs = self.model(**inputs)
        width, height = pil.size
        (result,) = self.image_processor.post_process_object_detection(
            outputs, threshold=self.threshold, target_sizes=[(height, width)]
        )
        order = torch.argsort(result["scores"].float().cpu(), descending=True, stable=True)
        return result["boxes"].float().cpu()[order].tolist()

    def __repr__(self) -> str:
        return f"DetectorProposer(model={type(self.model).__name__}, top_k={self.top_k}, threshold={self.threshold})"


def _import_ximgproc():
    """``cv2.ximgproc``, or an ImportError that says which package brings it."""
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "SelectiveSearchProposer needs OpenCV's contrib modules: pip install opencv-contrib-python-headless "
            "(or the package's extra: pip install 'mqspn[selective-search]')"
        ) from None
    if not hasattr(cv2, "ximgproc"):
        raise ImportError(
            f"the installed OpenCV {cv2.__version__} lacks the contrib module ximgproc: replace opencv-python(-headless) "
            "by opencv-contrib-python-headless"
        )
    return cv2


def selective_search_available() -> bool:
    """Whether ``SelectiveSearchProposer`` can run here (OpenCV with the contrib ``ximgproc`` module)."""
    try:
        _import_ximgproc()
    except ImportError:
        return False
    return True


class SelectiveSearchProposer(RegionProposer):
    """OpenCV selective search (Uijlings et al., 2013): a weight-free fallback proposer.

    The image is scaled so that its longer side is at most ``max_side`` pixels (selective search is
    slow on large images) and segmented with the "fast" strategy. OpenCV ranks the regions with a
    random factor drawn from C's ``rand()``, which Python cannot seed, so its order changes from call
    to call; the regions are therefore re-ranked deterministically: regions thinner than
    ``min_size_fraction`` of the image's shorter side are skipped (texture fragments, not objects),
    the rest sorted by descending area, and a region is kept only when its IoU with every larger kept
    one is below ``nms_iou`` (so k boxes cover the picture at several scales instead of repeating one
    object). Boxes are scaled back to the original pixels.
    """

    def __init__(self, top_k: int = DEFAULT_MAX_REGIONS, max_side: int = 500, min_size_fraction: float = 0.05, nms_iou: float = 0.5):
        super().__init__(top_k)
        self.cv2 = _import_ximgproc()
        if int(max_side) < 16:
            raise ValueError(f"max_side must be at least 16 pixels, got {max_side}")
        if not 0.0 <= float(min_size_fraction) < 1.0:
            raise ValueError(f"min_size_fraction must lie in [0, 1), got {min_size_fraction}")
        if not 0.0 < float(nms_iou) <= 1.0:
            raise ValueError(f"nms_iou must lie in (0, 1], got {nms_iou}")
        self.max_side = int(max_side)
        self.min_size_fraction = float(min_size_fraction)
        self.nms_iou = float(nms_iou)

    def _raw_boxes(self, image, pil):
        cv2 = self.cv2
        width, height = pil.size
        scale = min(1.0, self.max_side / max(width, height))
        small = pil.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR) if scale < 1.0 else pil
        bgr = np.ascontiguousarray(np.asarray(small)[:, :, ::-1])
        search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
        search.setBaseImage(bgr)
        search.switchToSelectiveSearchFast()
        rects = np.asarray(search.process()).reshape(-1, 4)  # (N, 4) x, y, w, h in the scaled image
        min_side = self.min_size_fraction * min(small.size)
        rects = rects[(rects[:, 2] >= min_side) & (rects[:, 3] >= min_side)]
        # Deterministic order: area descending, ties by position; exact duplicates removed.
        rects = np.unique(rects, axis=0)
        rects = rects[np.lexsort((rects[:, 1], rects[:, 0], -(rects[:, 2] * rects[:, 3])))]
        kept: List[List[float]] = []
        for x, y, w, h in rects.tolist():
            box = [float(x), float(y), float(x + w), float(y + h)]
            if all(box_iou(box, other) < self.nms_iou for other in kept):
                kept.append(box)
                if len(kept) >= self.top_k:
                    break
        return [[v / scale for v in box] for box in kept]

    def __repr__(self) -> str:
        return f"SelectiveSearchProposer(top_k={self.top_k}, max_side={self.max_side}, nms_iou={self.nms_iou})"


def get_proposer(spec: Any, top_k: int = DEFAULT_MAX_REGIONS, **kwargs) -> Any:
    """A proposer from a name or an object.

    Args:
        spec: an object with ``propose(image)`` (returned as it is), or one of ``"vinvl"`` (needs
            ``directory=``), ``"boxes"`` (needs ``boxes=``), ``"detector"`` (needs ``model=``, optionally
            ``image_processor=``, ``threshold=``, ``device=``), ``"selective-search"`` (optionally
            ``max_side=``, ``min_size_fraction=``, ``nms_iou=``).
        top_k: k, the most boxes per image.
        kwargs: the chosen proposer's arguments.
    """
    if hasattr(spec, "propose"):
        if kwargs:
            raise ValueError(f"proposer arguments {sorted(kwargs)} are only for a proposer given by name")
        return spec
    classes = {
        "vinvl": VinVLProposer,
        "boxes": GivenBoxesProposer,
        "detector": DetectorProposer,
        "selective-search": SelectiveSearchProposer,
    }
    if spec not in classes:
        raise ValueError(f"unknown proposer {spec!r}: give an object with propose(image) or one of {PROPOSER_NAMES}")
    try:
        return classes[spec](top_k=top_k, **kwargs)
    except TypeError as error:
        raise TypeError(f"proposer {spec!r}: {error}") from None
