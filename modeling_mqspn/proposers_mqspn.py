"""Region proposers: candidate boxes for a new image (docs/DESIGN.md §6; paper §4.1 uses VinVL top-k).

Every proposer has one method, ``propose(image) -> boxes``: up to ``top_k`` boxes ``[x1, y1, x2, y2]``
in the image's pixels, best first, clipped to the image, with degenerate (thinner than one pixel) and
exact duplicate boxes dropped (``box_ops.sanitize_scored_boxes``); ``num_dropped`` counts the boxes dropped so
far. ``propose_scored(images)`` does the same for a batch (detectors run it as one forward pass) and
also returns each box's score (``box_ops.sanitize_scored_boxes``: sorted by descending score first;
``nms_iou`` adds greedy non-maximum suppression); ``processing/propose_regions.py`` writes these as
VinVL-layout files for a whole photo folder. ``MQSPNProcessor(boxes=proposer)`` and the
``grounded-ner`` pipeline take any object with ``propose``. The kinds, chosen by name with
``get_proposer``:

* ``"vinvl"`` (:class:`VinVLProposer`): the VinVL detection files of the GMNER releases
  (``<IMGID>.jpg.npz``), looked up by the image's file name — the regions the paper trains on.
* ``"boxes"`` (:class:`GivenBoxesProposer`): boxes the caller already has.
* ``"detector"`` (:class:`DetectorProposer`): any transformers object detector
  (``AutoModelForObjectDetection`` + its image processor's ``post_process_object_detection``), used
  class-agnostically: every detection is a candidate whatever its class, the top-k by score are kept.
* ``"owlv2"`` (:class:`Owlv2ObjectnessProposer`): OWLv2's objectness head (``Owlv2ForObjectDetection``),
  class-agnostic by construction, the closest stand-in for a region proposal network in transformers.
* ``"grounding-dino"`` (:class:`GroundingDinoProposer`): an open-vocabulary detector
  (``AutoModelForZeroShotObjectDetection``: Grounding DINO, MM Grounding DINO) prompted with the
  dataset's entity-type words (``"person. location. organization. thing."`` for Twitter-GMNER).
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

from .box_ops import box_iou, sanitize_scored_boxes
from .configuration_mqspn import DEFAULT_ENTITY_TYPES, DEFAULT_MAX_REGIONS, default_type_verbalizers
from .image_utils import load_rgb_image
from .schema_mqspn import as_box_list
from .vinvl_mqspn import load_vinvl_proposals, vinvl_file

__all__ = [
    "DETECTION_PROMPT_WORDS",
    "DETECTOR_MAX_SIDE",
    "DetectorProposer",
    "GivenBoxesProposer",
    "GroundingDinoProposer",
    "Owlv2ObjectnessProposer",
    "PROPOSER_NAMES",
    "RegionProposer",
    "SelectiveSearchProposer",
    "VinVLProposer",
    "get_proposer",
    "grounding_prompt",
    "selective_search_available",
]

PROPOSER_NAMES = ("vinvl", "boxes", "detector", "owlv2", "grounding-dino", "selective-search")
# A type word that names no visible thing, and the word an open-vocabulary detector is prompted with instead.
DETECTION_PROMPT_WORDS = {"other": "thing"}


class RegionProposer:
    """Base class: ``propose(image)`` reads the image, asks ``_raw_detections`` for boxes (and scores),
    and keeps the first ``top_k`` valid ones (sorted by descending score when there are scores,
    clipped, non-degenerate, no exact duplicates, and with ``nms_iou`` no box overlapping a better
    kept one at IoU >= ``nms_iou``).

    Args:
        top_k: k, the most boxes returned (the model's ``max_regions``; paper: 18).
        nms_iou: greedy non-maximum suppression threshold, or None for none (the default, as VinVL's
            files are used as they are).
    """

    def __init__(self, top_k: int = DEFAULT_MAX_REGIONS, nms_iou: Optional[float] = None):
        if int(top_k) < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if nms_iou is not None and not 0.0 < float(nms_iou) <= 1.0:
            raise ValueError(f"nms_iou must lie in (0, 1] or be None, got {nms_iou}")
        self.top_k = int(top_k)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.num_dropped = 0

    def propose(self, image) -> List[List[float]]:
        """Up to ``top_k`` pixel boxes ``[x1, y1, x2, y2]`` for ``image``, best first."""
        (boxes, _), = self.propose_scored([image])
        return boxes

    def propose_scored(self, images: Sequence[Any], loaded: Optional[Sequence[Image.Image]] = None):
        """``[(boxes, scores), ...]``, one pair per image: up to ``top_k`` pixel boxes best first and
        their scores (rank scores ``1, (n-1)/n, ...`` for a proposer without scores).

        Args:
            images: the images as given (paths, PIL images, arrays, ...).
            loaded: the same images already read with ``load_rgb_image`` (skips reading them again).
        """
        pils = [load_rgb_image(image) for image in images] if loaded is None else list(loaded)
        if len(pils) != len(images):
            raise ValueError(f"{len(images)} images but {len(pils)} loaded images")
        raw = self._raw_detections(list(images), pils)
        results = []
        for pil, (boxes, scores) in zip(pils, raw):
            width, height = pil.size
            kept, kept_scores, dropped = sanitize_scored_boxes(
                boxes, scores, width, height, top_k=self.top_k, nms_iou=self._score_nms_iou()
            )
            self.num_dropped += dropped
            results.append(([list(box) for box in kept], kept_scores))
        return results

    def _score_nms_iou(self) -> Optional[float]:
        """The suppression threshold ``propose_scored`` applies (a proposer with its own may return None)."""
        return self.nms_iou

    def _raw_detections(self, images: List[Any], pils: List[Image.Image]):
        """``[(boxes, scores or None), ...]`` per image, boxes in pixels in any order when scored, else
        best first. The default asks ``_raw_boxes`` image by image (no scores)."""
        return [(self._raw_boxes(image, pil), None) for image, pil in zip(images, pils)]

    def _raw_boxes(self, image, pil: Image.Image) -> Sequence[Sequence[float]]:
        """Candidate boxes best first; ``image`` is the input as given, ``pil`` the image read from it."""
        raise NotImplementedError(f"{type(self).__name__} must implement _raw_boxes(image, pil) or _raw_detections")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(top_k={self.top_k})"


def _load_detector(model, processor, loader: str, processor_loader: str = "AutoImageProcessor"):
    """``(model, processor)`` from a folder / Hub name (loaded with the transformers Auto classes named
    by ``loader`` and ``processor_loader``) or as given."""
    if isinstance(model, (str, os.PathLike)):
        import transformers

        name = os.fspath(model)
        model = getattr(transformers, loader).from_pretrained(name)
        if processor is None:
            processor = getattr(transformers, processor_loader).from_pretrained(name)
    return model, processor


def _to_device(model, device):
    return model.eval() if device is None else model.to(device).eval()


def _model_inputs(inputs, model):
    """Processor outputs on the model's device, pixel values in its dtype (a half-precision detector)."""
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return inputs


# Detectors resize their input to at most this many pixels on the longer side (DETR-family 1333, OWLv2 960):
# larger photos are first shrunk with PIL, which is much faster than the image processors' own resizing of
# a full 12-megapixel array (OWLv2's anti-aliasing filter takes seconds per photo), and the boxes scaled back.
DETECTOR_MAX_SIDE = 1333


def _shrink(pils: Sequence[Image.Image], max_side: Optional[int]):
    """``(images at most max_side on the longer side, [(x scale, y scale) back to the originals])``."""
    small, scales = [], []
    for pil in pils:
        width, height = pil.size
        factor = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
        if factor < 1.0:
            shrunk = pil.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.BILINEAR,
                                reducing_gap=3.0)
            small.append(shrunk)
            scales.append((width / shrunk.size[0], height / shrunk.size[1]))
        else:
            small.append(pil)
            scales.append((1.0, 1.0))
    return small, scales


def _scale_back(boxes: Sequence[Sequence[float]], scale) -> List[List[float]]:
    sx, sy = scale
    if sx == 1.0 and sy == 1.0:
        return [list(box) for box in boxes]
    return [[x1 * sx, y1 * sy, x2 * sx, y2 * sy] for x1, y1, x2, y2 in boxes]


def _check_max_side(max_side):
    if max_side is not None and int(max_side) < 16:
        raise ValueError(f"max_side must be at least 16 pixels or None, got {max_side}")
    return None if max_side is None else int(max_side)


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
    (docs/DESIGN.md §10.3), read by ``vinvl_mqspn.load_vinvl_proposals`` (descending score). For another
    file name (``photo.png``) the file ``<directory>/photo.png.npz`` is read, as
    ``processing/propose_regions.py`` names it, else ``photo.jpg.npz``.

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
        by_name = os.path.join(self.directory, os.path.basename(path) + ".npz")
        file = by_name if os.path.isfile(by_name) else vinvl_file(self.directory, os.path.basename(path).split(".")[0])
        found = load_vinvl_proposals(file, top_k=self.top_k, image_size=pil.size)
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
        nms_iou: greedy non-maximum suppression over the score-sorted boxes (default None: DETR-style
            detectors need none).
        max_side: photos larger than this on the longer side are shrunk first (``DETECTOR_MAX_SIDE``;
            None = never), the boxes scaled back to the original pixels.
    """

    def __init__(self, model, image_processor=None, top_k: int = DEFAULT_MAX_REGIONS, threshold: float = 0.0, device=None,
                 nms_iou: Optional[float] = None, max_side: Optional[int] = DETECTOR_MAX_SIDE):
        super().__init__(top_k, nms_iou)
        self.max_side = _check_max_side(max_side)
        model, image_processor = _load_detector(model, image_processor, "AutoModelForObjectDetection")
        if image_processor is None:
            raise ValueError("DetectorProposer needs the detector's image_processor when given a model object")
        if not hasattr(image_processor, "post_process_object_detection"):
            raise ValueError(
                f"{type(image_processor).__name__} has no post_process_object_detection; give the image processor of "
                "an object detector (DETR, Conditional/Deformable DETR, YOLOS, RT-DETR, ...)"
            )
        self.model = _to_device(model, device)
        self.image_processor = image_processor
        self.threshold = float(threshold)

    @torch.no_grad()
    def _raw_detections(self, images, pils):
        pils, scales = _shrink(pils, self.max_side)
        inputs = _model_inputs(self.image_processor(images=pils, return_tensors="pt"), self.model)
        outputs = self.model(**inputs)
        sizes = [(pil.size[1], pil.size[0]) for pil in pils]
        results = self.image_processor.post_process_object_detection(outputs, threshold=self.threshold, target_sizes=sizes)
        return [
            (_scale_back(result["boxes"].float().cpu().tolist(), scale), result["scores"].float().cpu().tolist())
            for result, scale in zip(results, scales)
        ]

    def __repr__(self) -> str:
        return f"DetectorProposer(model={type(self.model).__name__}, top_k={self.top_k}, threshold={self.threshold})"



class Owlv2ObjectnessProposer(RegionProposer):
    """Class-agnostic proposals from OWLv2's objectness head (Minderer et al., 2023).

    ``Owlv2ForObjectDetection`` predicts one box per image patch (3,600 at 960 px / patch 16) and, with
    its objectness head, how likely that box holds an object at all, independent of any text query:
    the boxes with the highest objectness are region proposals. The image processor pads the image to
    a square (bottom and right) before resizing, so the normalised boxes are scaled by the longer side
    and then clipped to the image (boxes inside the padding are dropped as degenerate). Neighbouring
    patches often find the same object, so greedy non-maximum suppression at ``nms_iou`` (default 0.5)
    is on by default.

    Args:
        model: an ``Owlv2ForObjectDetection``, or a folder / Hub name
            (``google/owlv2-base-patch16-ensemble``).
        image_processor: its image processor; loaded from ``model`` when that is a name.
        top_k, nms_iou: as for every proposer.
        device: where the model runs (default: where it already is).
        max_side: photos larger than this on the longer side are shrunk first (``DETECTOR_MAX_SIDE``).
    """

    def __init__(self, model, image_processor=None, top_k: int = DEFAULT_MAX_REGIONS, nms_iou: Optional[float] = 0.5,
                 device=None, max_side: Optional[int] = DETECTOR_MAX_SIDE):
        super().__init__(top_k, nms_iou)
        self.max_side = _check_max_side(max_side)
        model, image_processor = _load_detector(model, image_processor, "Owlv2ForObjectDetection")
        for method in ("image_embedder", "objectness_predictor", "box_predictor"):
            if not hasattr(model, method):
                raise ValueError(
                    f"{type(model).__name__} has no {method}: the owlv2 proposer needs an Owlv2ForObjectDetection "
                    "(OWL-ViT v1 has no objectness head)"
                )
        if image_processor is None:
            raise ValueError("Owlv2ObjectnessProposer needs the model's image_processor when given a model object")
        self.model = _to_device(model, device)
        self.image_processor = image_processor

    @torch.no_grad()
    def _raw_detections(self, images, pils):
        pils, scales = _shrink(pils, self.max_side)
        pixel_values = self.image_processor(images=pils, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(self.model.device, dtype=next(self.model.parameters()).dtype)
        feature_map = self.model.image_embedder(pixel_values=pixel_values)[0]  # (B, h, w, D)
        batch, rows, columns, width = feature_map.shape
        features = feature_map.reshape(batch, rows * columns, width)
        scores = torch.sigmoid(self.model.objectness_predictor(features)).float().cpu()
        centers = self.model.box_predictor(features, feature_map).float().cpu()  # cx, cy, w, h of the padded square
        corners = torch.cat([centers[..., :2] - centers[..., 2:] / 2, centers[..., :2] + centers[..., 2:] / 2], dim=-1)
        results = []
        for pil, scale, image_boxes, image_scores in zip(pils, scales, corners, scores):
            side = float(max(pil.size))
            results.append((_scale_back((image_boxes * side).tolist(), scale), image_scores.tolist()))
        return results

    def __repr__(self) -> str:
        return f"Owlv2ObjectnessProposer(model={type(self.model).__name__}, top_k={self.top_k}, nms_iou={self.nms_iou})"


def grounding_prompt(type_words: Sequence[str]) -> str:
    """The open-vocabulary detection prompt of a label space's type words: lower case, each phrase
    ended by a full stop (Grounding DINO's format), ``DETECTION_PROMPT_WORDS`` substituted
    (``["person", "location", "organization", "other"]`` -> ``"person. location. organization. thing."``)."""
    phrases = []
    for word in type_words:
        phrase = " ".join(str(word).replace(".", " ").split()).lower()
        if not phrase:
            raise ValueError(f"type words must be non-empty, got {list(type_words)!r}")
        phrase = DETECTION_PROMPT_WORDS.get(phrase, phrase)
        if phrase not in phrases:
            phrases.append(phrase)
    if not phrases:
        raise ValueError("the detection prompt needs at least one type word")
    return " ".join(f"{phrase}." for phrase in phrases)


class GroundingDinoProposer(RegionProposer):
    """Class-agnostic top-k boxes of an open-vocabulary detector prompted with the entity-type words.

    The detector (``AutoModelForZeroShotObjectDetection`` with its processor's
    ``post_process_grounded_object_detection``: Grounding DINO, MM Grounding DINO) scores each of its
    queries by its best match with any prompt token; every query is a candidate whatever phrase it
    matched, and the boxes are sorted by that score.

    Args:
        model: the detector, or a folder / Hub name (``IDEA-Research/grounding-dino-tiny``).
        processor: its processor (image processor + tokenizer); loaded from ``model`` when that is a name.
        prompt: the text prompt; default ``grounding_prompt(type_words)``.
        type_words: the label space's words, e.g. an MQSPN config's ``type_verbalizers``; default the
            Twitter-GMNER types' words.
        top_k, nms_iou: as for every proposer.
        device: where the detector runs (default: where it already is).
        max_side: photos larger than this on the longer side are shrunk first (``DETECTOR_MAX_SIDE``).
    """

    def __init__(self, model, processor=None, prompt: Optional[str] = None, type_words: Optional[Sequence[str]] = None,
                 top_k: int = DEFAULT_MAX_REGIONS, nms_iou: Optional[float] = None, device=None,
                 max_side: Optional[int] = DETECTOR_MAX_SIDE):
        super().__init__(top_k, nms_iou)
        self.max_side = _check_max_side(max_side)
        model, processor = _load_detector(model, processor, "AutoModelForZeroShotObjectDetection", "AutoProcessor")
        if processor is None or not hasattr(processor, "post_process_grounded_object_detection"):
            raise ValueError(
                "GroundingDinoProposer needs the detector's processor (with post_process_grounded_object_detection), "
                "e.g. AutoProcessor.from_pretrained('IDEA-Research/grounding-dino-tiny')"
            )
        if prompt is not None and type_words is not None:
            raise ValueError("give either prompt or type_words, not both")
        if prompt is None:
            prompt = grounding_prompt(type_words if type_words is not None else default_type_verbalizers(DEFAULT_ENTITY_TYPES))
        if not str(prompt).strip():
            raise ValueError("the detection prompt is empty")
        self.prompt = str(prompt)
        self.model = _to_device(model, device)
        self.processor = processor

    @torch.no_grad()
    def _raw_detections(self, images, pils):
        pils, scales = _shrink(pils, self.max_side)
        texts = [self.prompt] * len(pils)
        inputs = _model_inputs(self.processor(images=pils, text=texts, return_tensors="pt"), self.model)
        outputs = self.model(**inputs)
        sizes = [(pil.size[1], pil.size[0]) for pil in pils]
        results = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=sizes
        )
        return [
            (_scale_back(result["boxes"].float().cpu().tolist(), scale), result["scores"].float().cpu().tolist())
            for result, scale in zip(results, scales)
        ]

    def __repr__(self) -> str:
        return f"GroundingDinoProposer(model={type(self.model).__name__}, prompt={self.prompt!r}, top_k={self.top_k})"


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

    def _score_nms_iou(self):
        return None  # its own area-ordered suppression (``_raw_boxes``), not the base class's score-ordered one

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
            ``image_processor=``, ``threshold=``, ``device=``, ``nms_iou=``), ``"owlv2"`` (needs ``model=``,
            optionally ``image_processor=``, ``nms_iou=``, ``device=``), ``"grounding-dino"`` (needs ``model=``,
            optionally ``processor=``, ``prompt=`` or ``type_words=``, ``nms_iou=``, ``device=``),
            ``"selective-search"`` (optionally
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
        "owlv2": Owlv2ObjectnessProposer,
        "grounding-dino": GroundingDinoProposer,
        "selective-search": SelectiveSearchProposer,
    }
    if spec not in classes:
        raise ValueError(f"unknown proposer {spec!r}: give an object with propose(image) or one of {PROPOSER_NAMES}")
    try:
        return classes[spec](top_k=top_k, **kwargs)
    except TypeError as error:
        raise TypeError(f"proposer {spec!r}: {error}") from None
