"""Region proposals for any photo collection, and how far they let a model ground (docs/DESIGN.md §6).

MQSPN only needs candidate boxes (its CLIP tower encodes the crops), so any proposer of
``proposers_mqspn`` can stand in for the VinVL files of the GMNER releases:

* ``propose_folder(images_dir, output_dir, proposer)`` writes one ``<image file name>.npz`` per image in
  the VinVL layout (``num_boxes``, ``bounding_boxes`` (N, 4) float32 pixel ``x1, y1, x2, y2``,
  ``scores`` (N,) float32; ``np.savez``, no pickle), which ``vinvl_mqspn.load_vinvl_proposals``, the
  dataset readers (``--vinvl_dir`` / ``--vinvl``) and ``VinVLProposer`` read unchanged. Images go to the
  proposer in batches; a folder half done is resumed (an image whose file exists is skipped unless
  ``overwrite``); each file is written to a temporary name and renamed, so a killed run leaves no
  half-written file; an image that cannot be read or proposed for is counted and listed, never fatal.
  ``propose_regions.json`` in the output folder records the settings (a resumed run with other settings
  is refused) and the last run's summary.
* ``proposal_coverage_of_rows(rows, k)``: the share of groundable gold entities (dataset rows,
  ``tools.data``) whose box some of the first k proposals covers at IoU >= 0.5, per type and overall
  (``tools.metrics.proposal_coverage``), the ceiling that the proposals put on EEG and GMNER recall;
  ``coverage_report`` / ``format_coverage_table`` for several proposers and k, and
  ``report_proposal_coverage`` for the training log.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from ..image_utils import load_rgb_image
from .metrics import IOU_THRESHOLD, proposal_coverage

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "coverage_report",
    "format_coverage_table",
    "list_images",
    "proposal_coverage_of_rows",
    "proposal_file",
    "propose_folder",
    "report_proposal_coverage",
    "write_proposal_file",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_NAME = "propose_regions.json"
_PARTIAL_SUFFIX = ".partial"
_MAX_LISTED = 1000  # failures kept in the summary (all are counted)


# --------------------------------------------------------------------------------------------------
# Files


def proposal_file(output_dir: str, image_name: str) -> str:
    """The proposal file of image ``image_name`` (a file name, e.g. ``123.jpg``): ``<output_dir>/123.jpg.npz``,
    the name the GMNER releases' VinVL files have (``vinvl_mqspn.vinvl_file``)."""
    return os.path.join(output_dir, os.path.basename(image_name) + ".npz")


def write_proposal_file(path: str, boxes: Sequence[Sequence[float]], scores: Sequence[float]) -> None:
    """Write one VinVL-layout ``.npz`` atomically (a temporary file in the same folder, then renamed)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{path}: {boxes.shape[0]} boxes but {scores.shape[0]} scores")
    partial = f"{path}.{os.getpid()}{_PARTIAL_SUFFIX}"
    try:
        with open(partial, "wb") as handle:
            np.savez(handle, num_boxes=np.asarray(boxes.shape[0], dtype=np.int64), bounding_boxes=boxes, scores=scores)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def list_images(images_dir: str, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    """``(image file names, other file names)`` of a folder (not recursive), sorted; an image is a file
    whose extension (any case) is one of ``extensions``."""
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"the image folder {images_dir} does not exist")
    images, others = [], []
    for name in sorted(os.listdir(images_dir)):
        if name.startswith(".") or not os.path.isfile(os.path.join(images_dir, name)):
            continue
        (images if os.path.splitext(name)[1].lower() in extensions else others).append(name)
    return images, others


def _check_manifest(output_dir: str, settings: Mapping[str, Any], overwrite: bool) -> None:
    path = os.path.join(output_dir, MANIFEST_NAME)
    if overwrite or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            earlier = json.load(handle).get("settings")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{path} cannot be read ({error}); delete it or pass overwrite=True / --overwrite") from None
    if earlier is not None and earlier != json.loads(json.dumps(settings)):
        raise ValueError(
            f"{output_dir} holds proposals made with other settings ({earlier}, now {dict(settings)}); resuming would "
            "mix them: choose another output folder or pass overwrite=True (--overwrite) to redo every image"
        )


def _write_manifest(output_dir: str, settings: Mapping[str, Any], summary: Optional[Mapping[str, Any]]) -> None:
    manifest = os.path.join(output_dir, MANIFEST_NAME)
    partial = f"{manifest}.{os.getpid()}{_PARTIAL_SUFFIX}"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump({"settings": settings, "last_run": summary}, handle, indent=2)
    os.replace(partial, manifest)


# --------------------------------------------------------------------------------------------------
# Proposing for a folder


def propose_folder(
    images_dir: str,
    output_dir: str,
    proposer,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    settings: Optional[Mapping[str, Any]] = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> Dict[str, Any]:
    """Write ``<output_dir>/<image file name>.npz`` for every image of ``images_dir`` (module docstring).

    Args:
        images_dir: the photo folder (its image files, not recursive; other files are counted as ignored).
        output_dir: where the proposal files go (created).
        proposer: a ``proposers_mqspn`` proposer (anything with ``propose_scored``; an object with only
            ``propose(image) -> boxes`` gets rank scores).
        batch_size: images per proposer call (one forward pass for the detectors).
        overwrite: redo images whose file exists (default: skip them, so a killed run resumes).
        progress: show a tqdm progress bar.
        settings: what made the proposals (recorded; a resumed run with other settings is refused);
            default ``{"proposer": repr(proposer)}``.

    Returns:
        The summary (also written to ``<output_dir>/propose_regions.json``): ``images`` found,
        ``proposed`` (files written), ``skipped_existing``, ``failed`` with ``failures``
        (``[{"image", "error"}]``), ``ignored_files`` (non-image files) with examples, ``boxes`` written,
        ``images_without_boxes``, ``removed_partial_files`` (left by a killed run), ``seconds`` and
        ``images_per_second``.
    """
    from tqdm.auto import tqdm

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    settings = dict(settings) if settings is not None else {"proposer": repr(proposer)}
    images, others = list_images(images_dir, extensions)
    os.makedirs(output_dir, exist_ok=True)
    _check_manifest(output_dir, settings, overwrite)
    _write_manifest(output_dir, settings, None)  # before any file: a killed run is still guarded
    removed = 0
    for partial in glob.glob(os.path.join(glob.escape(output_dir), f"*{_PARTIAL_SUFFIX}")):
        os.remove(partial)
        removed += 1

    todo = [name for name in images if overwrite or not os.path.isfile(proposal_file(output_dir, name))]
    summary: Dict[str, Any] = {
        "images_dir": os.path.abspath(images_dir),
        "output_dir": os.path.abspath(output_dir),
        "settings": settings,
        "images": len(images),
        "proposed": 0,
        "skipped_existing": len(images) - len(todo),
        "failed": 0,
        "failures": [],
        "ignored_files": len(others),
        "ignored_examples": others[:5],
        "boxes": 0,
        "images_without_boxes": 0,
        "removed_partial_files": removed,
    }

    def fail(name: str, error: BaseException) -> None:
        summary["failed"] += 1
        if len(summary["failures"]) < _MAX_LISTED:
            summary["failures"].append({"image": name, "error": f"{type(error).__name__}: {error}"})

    def propose(paths, pils):
        if hasattr(proposer, "propose_scored"):
            return proposer.propose_scored(paths, loaded=pils)
        results = []
        for path in paths:
            boxes = [list(map(float, box)) for box in proposer.propose(path)]
            results.append((boxes, [(len(boxes) - rank) / len(boxes) for rank in range(len(boxes))]))
        return results

    def write(name: str, boxes, scores) -> None:
        try:
            write_proposal_file(proposal_file(output_dir, name), boxes, scores)
        except (OSError, ValueError) as error:
            fail(name, error)
            return
        summary["proposed"] += 1
        summary["boxes"] += len(boxes)
        summary["images_without_boxes"] += not boxes

    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="image", desc="proposing", disable=not progress)
    for start in range(0, len(todo), batch_size):
        names, paths, pils = [], [], []
        for name in todo[start : start + batch_size]:
            path = os.path.join(images_dir, name)
            try:
                pils.append(load_rgb_image(path))
            except (ValueError, OSError) as error:
                fail(name, error)
                continue
            names.append(name)
            paths.append(path)
        if names:
            try:
                results = propose(paths, pils)
            except Exception:  # noqa: BLE001 - one bad image must not take its batch down: retry one by one
                results = None
            if results is not None:
                for name, (boxes, scores) in zip(names, results):
                    write(name, boxes, scores)
            else:
                for name, path, pil in zip(names, paths, pils):
                    try:
                        ((boxes, scores),) = propose([path], [pil])
                    except Exception as error:  # noqa: BLE001 - counted and listed, the run goes on
                        fail(name, error)
                        continue
                    write(name, boxes, scores)
        bar.update(len(todo[start : start + batch_size]))
        bar.set_postfix(failed=summary["failed"])
    bar.close()
    seconds = time.perf_counter() - started
    summary["seconds"] = round(seconds, 3)
    summary["images_per_second"] = round(len(todo) / seconds, 3) if seconds > 0 and todo else None
    _write_manifest(output_dir, settings, summary)
    return summary


# --------------------------------------------------------------------------------------------------
# Coverage: the EEG / GMNER ceiling the proposals impose


def proposal_coverage_of_rows(
    rows: Iterable[Mapping[str, Any]], k: Optional[int] = None, iou_threshold: float = IOU_THRESHOLD
) -> Dict[str, Any]:
    """``tools.metrics.proposal_coverage`` of dataset rows (``id``, ``entities`` with ``boxes``,
    ``proposals``) with each row's first ``k`` proposals (all when None): ``coverage`` (covered /
    groundable), ``per_type``, ``groundable``, ``covered``, ``uncovered``, ``recall_ceiling``."""
    gold, proposals = {}, {}
    for row in rows:
        sample_id = str(row["id"])
        gold[sample_id] = [(e["start"], e["end"], e["type"], [list(b) for b in e["boxes"]]) for e in row["entities"]]
        candidates = [list(b) for b in (row.get("proposals") or [])]
        proposals[sample_id] = candidates if k is None else candidates[:k]
    return proposal_coverage(gold, proposals, iou_threshold)


def coverage_report(
    rows_by_proposer: Mapping[str, Sequence[Mapping[str, Any]]],
    ks: Sequence[int],
    iou_threshold: float = IOU_THRESHOLD,
) -> Dict[str, Any]:
    """Coverage of several proposers' proposals for the same rows, at each k of ``ks``:
    ``{"iou_threshold", "ks", "proposers": {name: {str(k): proposal_coverage_of_rows(rows, k)}}}``."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"k values must be positive integers, got {ks}")
    return {
        "iou_threshold": iou_threshold,
        "ks": ks,
        "proposers": {
            name: {str(k): proposal_coverage_of_rows(rows, k, iou_threshold) for k in ks}
            for name, rows in rows_by_proposer.items()
        },
    }


def format_coverage_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of ``coverage_report``: one line per proposer and k, the covered share of the
    groundable entities overall and per type (percent), and the counts."""
    types = sorted({t for by_k in report["proposers"].values() for row in by_k.values() for t in row["per_type"]})
    name_width = max([8] + [len(name) for name in report["proposers"]])
    header = f"{'proposer':<{name_width}} {'k':>4} {'overall':>8} " + " ".join(f"{t:>8}" for t in types)
    lines = [
        f"share of groundable gold entities with a proposal at IoU >= {report['iou_threshold']} (percent; "
        "the ceiling on EEG and GMNER recall of grounded entities)",
        header + f" {'covered':>8} {'of':>6}",
    ]
    for name, by_k in report["proposers"].items():
        for k, row in by_k.items():
            cells = " ".join(
                f"{100 * row['per_type'][t]['coverage']:>8.2f}" if t in row["per_type"] else f"{'-':>8}" for t in types
            )
            lines.append(
                f"{name:<{name_width}} {k:>4} {100 * row['coverage']:>8.2f} {cells} {row['covered']:>8} {row['groundable']:>6}"
            )
    return "\n".join(lines)


def report_proposal_coverage(splits: Mapping[str, Sequence[Mapping[str, Any]]], k: int, log: Callable, echo: Callable = print):
    """The training log's coverage line: for each split, the share of groundable gold entities that the
    first ``k`` proposals it trains / is evaluated on cover (``proposal_coverage_of_rows``), logged as
    ``{"event": "proposal_coverage", "step": 0, "k", "splits": {split: {...}}}`` and echoed as one line
    per split. Returns the per-split coverage."""
    splits_coverage = {split: proposal_coverage_of_rows(rows, k) for split, rows in splits.items()}
    log({"event": "proposal_coverage", "step": 0, "k": k, "splits": splits_coverage})
    for split, row in splits_coverage.items():
        if not row["groundable"]:
            echo(f"{split}: no groundable gold entity, so the proposals put no ceiling on grounding")
            continue
        per_type = ", ".join(f"{t} {100 * r['coverage']:.1f}" for t, r in row["per_type"].items())
        echo(
            f"{split}: proposals (k={k}) cover {row['covered']} of {row['groundable']} groundable entities at IoU >= "
            f"{IOU_THRESHOLD} ({100 * row['coverage']:.2f}%{'; ' + per_type if per_type else ''}): the ceiling on "
            "grounded EEG / GMNER recall"
        )
    return splits_coverage
