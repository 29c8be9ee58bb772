"""On-disk cache of the frozen vision tower's region features (docs/DESIGN.md §1, "Cached features").

The CLIP vision tower is frozen (paper §3.1), so the pooled feature of a proposal crop depends only
on the image, the box, the crop rule and the tower's weights. ``RegionFeatureCache`` computes it
once through ``model.encode_regions`` and stores it, so training never encodes the same crop
twice, across epochs and runs (docs/DESIGN.md §10.5: the authors' code re-encodes every crop on every
step).

Keys. A feature is found by four things, and a change in any one of them misses instead of reading
a stale feature:

- the **tower fingerprint**: a hash of every tensor of ``model.vision_model`` (name, dtype, shape,
  bytes), the vision config and the cache format version;
- the **crop key**: the processor's class, ``crop_mode`` and its image processor's settings
  (``to_dict()``: size, crop size, mean, std, resampling, ...);
- the **image**: a hash of the image file's bytes (the same picture under another path hits);
- the **box**: its pixel coordinates rounded to ``BOX_DECIMALS`` decimals.

Layout: ``<cache_dir>/<namespace>/`` with namespace = hash(tower fingerprint, crop key), holding a
``key.json`` that records both in clear, and one safetensors file per image,
``<namespace>/<h[:2]>/<h>.safetensors`` (h = the image hash) with ``boxes`` (M, 4) float64 and
``features`` (M, D_v) float32. New boxes of an image are merged into its file, written to a
temporary file and renamed, so concurrent processes never read a half-written file (the worst a
race does is drop a merge, which the next reader recomputes).

A missing or unreadable image is not fatal (docs/DESIGN.md §1): ``get`` returns no features (a (0, D_v)
tensor, the sample keeps only the ungroundable token), warns once per file, and counts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .. import processing_mqspn
from ..image_utils import load_rgb_image

__all__ = [
    "BOX_DECIMALS",
    "CACHE_FORMAT_VERSION",
    "RegionFeatureCache",
    "crop_key",
    "vision_tower_fingerprint",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
BOX_DECIMALS = 2


def vision_tower_fingerprint(model) -> str:
    """A hex digest of the frozen tower's weights and config: ``model.vision_model``'s state dict
    (every tensor's name, dtype, shape and bytes, so a cast to bfloat16 changes it too) and
    ``model.config.vision_config``."""
    tower = getattr(model, "vision_model", None)
    if tower is None:
        raise ValueError(
            f"{type(model).__name__} has no vision tower (model.vision_model is None, e.g. "
            "include_vision_tower=False), so it cannot compute region features to cache; load a "
            "checkpoint that includes the vision tower"
        )
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"format={CACHE_FORMAT_VERSION};tower={type(tower).__name__};".encode())
    digest.update(model.config.vision_config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def crop_key(processor) -> Dict[str, Any]:
    """What decides the pixels of a crop: the processor class, ``crop_mode``, the largest padded crop side
    (``processing_mqspn.MAX_PAD_SIDE``) and the image processor's settings."""
    image_processor = processor.image_processor
    settings = image_processor.to_dict() if hasattr(image_processor, "to_dict") else vars(image_processor)
    return {
        "processor": type(processor).__name__,
        "crop_mode": processor.crop_mode,
        "max_pad_side": processing_mqspn.MAX_PAD_SIDE,
        "image_processor": json.loads(json.dumps(settings, sort_keys=True, default=str)),
    }


def _as_boxes(boxes) -> np.ndarray:
    """(K, 4) float64 pixel boxes; a clear error for anything else."""
    array = np.asarray(boxes if len(boxes) else np.zeros((0, 4)), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4 or not np.all(np.isfinite(array)):
        raise ValueError(f"boxes must be a (K, 4) array of finite x1, y1, x2, y2 pixels, got shape {array.shape}")
    return array


def _box_keys(boxes: np.ndarray) -> List[Tuple[float, ...]]:
    """The cache key of each box: its coordinates rounded to ``BOX_DECIMALS``."""
    return [tuple(box) for box in (np.round(boxes, BOX_DECIMALS) + 0.0).tolist()]  # + 0.0: no -0.0


class RegionFeatureCache:
    """Frozen vision-tower features of (image, box) pairs, computed once and kept on disk.

    Args:
        cache_dir: root folder of the cache (shared by towers and crop rules: each gets its own
            namespace sub-folder).
        model: exposes ``encode_regions(pixel_values (N, 3, H, W)) -> (N, D_v)``,
            ``vision_model`` and ``config.vision_config`` (``MQSPNForGroundedNER``).
        processor: exposes ``prepare_crops(image, boxes) -> (K, 3, H, W)``, ``crop_mode`` and
            ``image_processor`` (``MQSPNProcessor``).
        batch_size: most crops per ``encode_regions`` call.

    Counters (since construction): ``misses`` counts the crops encoded, ``hits`` the other
    requested boxes (found on disk, or repeated within one request), ``tower_calls`` counts
    ``encode_regions`` calls, ``missing_images`` the distinct image files that were missing or
    unreadable (``missing_image_paths`` lists them).
    """

    def __init__(self, cache_dir: os.PathLike, model, processor, batch_size: int = 64):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.batch_size = int(batch_size)
        self.feature_size = int(model.config.vision_config.hidden_size)  # D_v
        self.tower_fingerprint = vision_tower_fingerprint(model)
        self.crop_key = crop_key(processor)
        key = {"tower_fingerprint": self.tower_fingerprint, "crop_key": self.crop_key}
        key_json = json.dumps(key, sort_keys=True, indent=1)
        self.namespace = hashlib.blake2b(key_json.encode(), digest_size=10).hexdigest()
        self.directory = os.path.join(os.fspath(cache_dir), self.namespace)
        os.makedirs(self.directory, exist_ok=True)
        key_path = os.path.join(self.directory, "key.json")
        if not os.path.exists(key_path):
            self._atomic_write_bytes(key_path, (key_json + "\n").encode())
        self.hits = 0
        self.misses = 0
        self.tower_calls = 0
        self.missing_image_paths: List[str] = []
        self._image_hashes: Dict[Tuple[str, int, int], str] = {}

    @property
    def missing_images(self) -> int:
        return len(self.missing_image_paths)

    def counters(self) -> Dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "tower_calls": self.tower_calls,
            "missing_images": self.missing_images,
        }

    # ------------------------------------------------------------------------------------------
    # Public API

    def get(self, image_path: Optional[os.PathLike], boxes) -> torch.FloatTensor:
        """Features of ``boxes`` (K, 4 pixels) in ``image_path`` → (K, D_v) float32 on the CPU,
        row i for box i. Misses go through the tower in one batch (split by ``batch_size``) and
        are stored. A missing or unreadable image (or ``image_path`` None) → (0, D_v): the sample
        gets zero proposals."""
        boxes = _as_boxes(boxes)
        if not len(boxes):
            return torch.zeros(0, self.feature_size)
        image_hash = self._image_hash(image_path)
        if image_hash is None:
            return torch.zeros(0, self.feature_size)
        keys = _box_keys(boxes)
        entry = self._load_entry(image_hash)
        missing = self._missing_boxes(entry, keys, boxes)
        self.hits += len(keys) - len(missing)
        if missing:
            crops = self._crops(image_path, list(missing.values()))
            if crops is None:
                return torch.zeros(0, self.feature_size)
            entry = self._store(image_hash, dict(zip(missing, self._encode(crops))))
        return torch.from_numpy(np.stack([entry[key] for key in keys]))

    def precompute(self, dataset: Iterable[Mapping[str, Any]], max_regions: Optional[int] = None) -> Dict[str, int]:
        """Fill the cache for every row of ``dataset`` (rows with ``image`` (path or None) and
        ``proposals`` (list of boxes), e.g. a ``datasets.Dataset`` from ``data_mqspn``), batching
        crops of several images into each tower call. Only the first ``max_regions`` proposals of
        a row are used (default ``model.config.max_regions``; None in the config = all).

        Returns the counts of this pass: ``rows``, ``boxes``, ``hits``, ``misses``,
        ``tower_calls``, ``missing_images`` (rows whose image was missing or unreadable); the
        missing images are also summarised in one warning."""
        if max_regions is None:
            max_regions = getattr(self.model.config, "max_regions", None)
        before = self.counters()
        stats = {"rows": 0, "boxes": 0, "missing_images": 0}
        pending: Dict[str, Dict[Tuple[float, ...], torch.Tensor]] = {}  # image hash → box → crop
        pending_crops = 0
        examples: List[str] = []  # the rows without usable pixels, for the warning
        for row in dataset:
            stats["rows"] += 1
            proposals = row["proposals"] if max_regions is None else row["proposals"][:max_regions]
            boxes = _as_boxes(proposals)
            if not len(boxes):
                continue
            stats["boxes"] += len(boxes)
            image_path = row.get("image")
            if image_path is None:
                # Proposals but no image (the reader found no file): the tweet trains as "no image".
                stats["missing_images"] += 1
                examples.append(f"sample {row.get('id')!r} (no image file)")
                continue
            image_hash = self._image_hash(image_path, sample_id=row.get("id"))
            if image_hash is None:
                stats["missing_images"] += 1
                examples.append(os.fspath(image_path))
                continue
            keys = _box_keys(boxes)
            known = {**self._load_entry(image_hash), **pending.get(image_hash, {})}
            missing = self._missing_boxes(known, keys, boxes)
            self.hits += len(keys) - len(missing)
            if not missing:
                continue
            crops = self._crops(image_path, list(missing.values()), sample_id=row.get("id"))
            if crops is None:
                stats["missing_images"] += 1
                examples.append(os.fspath(image_path))
                continue
            pending.setdefault(image_hash, {}).update(zip(missing, crops))
            pending_crops += len(missing)
            if pending_crops >= self.batch_size:
                self._flush(pending)
                pending, pending_crops = {}, 0
        self._flush(pending)
        after = self.counters()
        stats.update({name: after[name] - before[name] for name in ("hits", "misses", "tower_calls")})
        if stats["missing_images"]:
            logger.warning(
                "%d of %d rows have a missing or unreadable image (e.g. %s); they get zero proposals",
                stats["missing_images"],
                stats["rows"],
                examples[0],
            )
        return stats

    # ------------------------------------------------------------------------------------------
    # Internals

    def _image_hash(self, image_path, sample_id=None) -> Optional[str]:
        """blake2b of the file's bytes, memoised per (path, mtime, size); None (warned, counted)
        when the file is missing."""
        if image_path is None:
            return None
        path = os.path.abspath(os.fspath(image_path))
        try:
            stat = os.stat(path)
            memo = (path, stat.st_mtime_ns, stat.st_size)
            if memo not in self._image_hashes:
                with open(path, "rb") as handle:
                    self._image_hashes[memo] = hashlib.blake2b(handle.read(), digest_size=16).hexdigest()
            return self._image_hashes[memo]
        except OSError as error:
            self._report_missing(path, f"not readable ({error.strerror or error})", sample_id)
            return None

    def _report_missing(self, path: str, why: str, sample_id) -> None:
        if path not in self.missing_image_paths:
            self.missing_image_paths.append(path)
            where = f"sample {sample_id!r}: " if sample_id is not None else ""
            logger.warning("%simage %s is %s; it gets zero proposals", where, path, why)

    def _entry_path(self, image_hash: str) -> str:
        return os.path.join(self.directory, image_hash[:2], f"{image_hash}.safetensors")

    def _load_entry(self, image_hash: str) -> Dict[Tuple[float, ...], np.ndarray]:
        path = self._entry_path(image_hash)
        if not os.path.exists(path):
            return {}
        try:
            tensors = load_file(path)
            boxes, features = tensors["boxes"], tensors["features"]
        except (OSError, KeyError, ValueError, SafetensorError) as error:  # truncated or foreign: recompute
            logger.warning("feature cache file %s is unreadable (%s); its features are recomputed", path, error)
            return {}
        if features.ndim != 2 or features.shape[1] != self.feature_size or len(boxes) != len(features):
            logger.warning(
                "feature cache file %s holds features of shape %s for %d boxes, expected D_v = %d; "
                "recomputed",
                path,
                features.shape,
                len(boxes),
                self.feature_size,
            )
            return {}
        return {tuple(box): feature for box, feature in zip(boxes.tolist(), features)}

    @staticmethod
    def _missing_boxes(entry, keys, boxes: np.ndarray) -> Dict[Tuple[float, ...], np.ndarray]:
        """key → box for the distinct keys not in ``entry``, in first-seen order. The crop is made
        from the box as given (not the rounded key), so a miss equals direct computation."""
        missing: Dict[Tuple[float, ...], np.ndarray] = {}
        for key, box in zip(keys, boxes):
            if key not in entry:
                missing.setdefault(key, box)
        return missing

    def _crops(self, image_path, boxes: Sequence[Tuple[float, ...]], sample_id=None) -> Optional[torch.Tensor]:
        """(K, 3, H, W) crops of ``boxes`` by the processor, or None (warned, counted) when the image
        cannot be decoded."""
        path = os.path.abspath(os.fspath(image_path))
        try:
            image = load_rgb_image(path)  # upright, as the processor and the proposers read it
        except ValueError as error:
            self._report_missing(path, f"unreadable ({error})", sample_id)
            return None
        return self.processor.prepare_crops(image, np.asarray(boxes, dtype=np.float64))

    def _encode(self, crops: torch.Tensor) -> np.ndarray:
        """Run the tower on (N, 3, H, W) crops in chunks of ``batch_size`` → (N, D_v) float32."""
        outputs = []
        with torch.no_grad():
            for start in range(0, len(crops), self.batch_size):
                features = self.model.encode_regions(crops[start : start + self.batch_size])
                self.tower_calls += 1
                outputs.append(features.detach().to("cpu", torch.float32).numpy())
        self.misses += len(crops)
        result = np.concatenate(outputs) if outputs else np.zeros((0, self.feature_size), np.float32)
        if result.shape != (len(crops), self.feature_size):
            raise ValueError(
                f"model.encode_regions returned shape {result.shape} for {len(crops)} crops; expected "
                f"({len(crops)}, {self.feature_size}) = (N, vision_config.hidden_size)"
            )
        return result

    def _flush(self, pending: Dict[str, Dict[Tuple[float, ...], torch.Tensor]]) -> None:
        """Encode the crops of several images together and store each image's new features."""
        if not pending:
            return
        order = [(image_hash, box) for image_hash, crops in pending.items() for box in crops]
        features = self._encode(torch.stack([pending[h][b] for h, b in order]))
        per_image: Dict[str, Dict[Tuple[float, ...], np.ndarray]] = {}
        for (image_hash, box), feature in zip(order, features):
            per_image.setdefault(image_hash, {})[box] = feature
        for image_hash, new in per_image.items():
            self._store(image_hash, new)

    def _store(self, image_hash: str, new: Dict[Tuple[float, ...], np.ndarray]):
        """Merge ``new`` features into the image's file (re-read first, so features another
        process wrote meanwhile are kept) and write it atomically; returns the merged entry."""
        entry = self._load_entry(image_hash)
        entry.update(new)
        boxes = np.asarray(list(entry), dtype=np.float64).reshape(-1, 4)
        features = np.stack(list(entry.values())).astype(np.float32)
        path = self._entry_path(image_hash)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(handle)
        try:
            save_file({"boxes": boxes, "features": np.ascontiguousarray(features)}, tmp_path)
            os.replace(tmp_path, path)
        finally:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
        return entry

    @staticmethod
    def _atomic_write_bytes(path: str, data: bytes) -> None:
        handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp_path, path)
