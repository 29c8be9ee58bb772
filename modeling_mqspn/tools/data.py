"""Dataset readers: Twitter-GMNER, Twitter-FMNERG and a plain JSONL format → ``datasets.Dataset``
(paper §4.1 "Datasets"; docs/DESIGN.md §10; the row schema is ``docs/ARCHITECTURE.md``
"Dataset rows").

Every reader returns ``(dataset, report)``: the ``datasets.Dataset`` with the typed features of
``dataset_features()`` and a ``DataReport`` that counts what was read and every repair made
(nothing is dropped silently). Rows are::

    {"id": str, "words": [str], "entities": [{"start": int, "end": int (inclusive word indices),
     "type": str, "boxes": [[x1, y1, x2, y2], ...] (pixels; empty = not groundable)}],
     "image": str path | None, "image_size": [width, height] | None, "proposals": [[x1, y1, x2, y2]]}

**Twitter-GMNER** (``load_twitter_gmner``): a CoNLL file (``IMGID:<id>`` line, one
``token<TAB>BIO-tag`` line per token, a blank line after each tweet) and an ``xml/`` folder of
Pascal VOC files, ``<id>.xml``. An xml ``<object>``'s ``<name>`` is the entity's tokens joined by
single spaces; several objects with one name are several boxes of that entity (two mentions with
the same surface string therefore share their boxes); an entity no object names is not groundable;
a tweet without a groundable entity has no xml file. ``image_size`` comes from the xml ``<size>``,
else from the image file's header
(upright: EXIF orientation applied, as ``image_utils`` reads the pixels). xml files declaring a DTD or entities are refused (defusedxml is
used when installed).

**Twitter-FMNERG** (``load_twitter_fmnerg``): the same CoNLL layout with three columns,
``token<TAB>coarse-BIO<TAB>fine-BIO`` (lower-case labels), boxes from the Twitter-GMNER xml folder.
``label_space`` is ``"coarse"`` (8 types), ``"fine"`` (51 types) or ``"gmner"`` (coarse mapped:
person→PER, organization→ORG, location and building→LOC, art, event, product, other→OTHER).

**JSONL** (``load_jsonl``): one object per line::

    {"id": "t1",                                  # required, unique
     "words": ["Clark", "Kent", "in", "Metropolis"],  # or "text": "Clark Kent in Metropolis"
     "entities": [                                # required (may be empty)
        {"start": 0, "end": 1, "type": "PER",     # word indices, inclusive end
         "boxes": [[40, 28, 296, 600]],           # optional, pixels; [] or absent = not groundable
         "text": "Clark Kent"}],                  # optional; checked against the words when given
     "image": "images/t1.jpg",                    # optional; relative to the JSONL file's folder
     "image_size": [640, 480],                    # optional [width, height]; else read from image
     "proposals": [[30, 20, 300, 610]]}           # optional candidate boxes, pixels, score order

``"text"`` is split into words by ``processing_mqspn.split_words``, the rule the processor and the
pipeline apply to a raw string at inference (runs of letters and digits; every other non-space
character a word of its own), so a model sees the same words in training and in use; entity
``start`` / ``end`` index those words. Unknown keys are errors (they are
usually typos). The format is also described in ``docs/DATA.md``.

BIO decoding (all formats with tags): ``B-X`` always starts a new entity, so an entity that starts
right after another is kept (the authors' reader loses these, docs/DESIGN.md §10.5); an ``I-X`` that
does not continue an open ``X`` entity is read as ``B-X`` and counted as a warning; a type outside
the label space is an error naming the file and line, and so is a malformed line. Boxes outside the
image are clipped to it (counted); boxes that are degenerate after clipping are removed (counted).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from xml.etree import ElementTree

from ..configuration_mqspn import DEFAULT_ENTITY_TYPES, DEFAULT_MAX_REGIONS
from ..box_ops import clip_box, is_degenerate, is_finite_box, sanitize_boxes
from .file_utils import parse_json_line, utf8_lines
from ..image_utils import upright_image_size
from ..processing_mqspn import split_words
from ..schema_mqspn import is_index, parse_box, parse_entity
from ..vinvl_mqspn import load_vinvl_proposals, vinvl_file

__all__ = [
    "DataReport",
    "FMNERG_COARSE_TO_GMNER",
    "FMNERG_COARSE_TYPES",
    "FMNERG_FINE_TYPES",
    "FMNERG_LABEL_SPACES",
    "FMNERG_TYPE_HIERARCHY",
    "GMNER_TYPES",
    "dataset_features",
    "decode_bio",
    "load_jsonl",
    "load_twitter_fmnerg",
    "load_twitter_gmner",
    "read_voc_xml",
    "write_references_jsonl",
]

logger = logging.getLogger(__name__)

GMNER_TYPES = DEFAULT_ENTITY_TYPES

# Twitter-FMNERG coarse → fine types (docs/DESIGN.md §10.4; the release's type_hierarchy.json).
FMNERG_TYPE_HIERARCHY: Dict[str, Tuple[str, ...]] = {
    "person": (
        "actor", "artist", "athlete", "author", "businessman", "character", "coach", "director",
        "intellectual", "journalist", "musician", "person_other", "politician",
    ),
    "organization": (
        "band", "company", "educational_institution", "government_agency", "news_agency",
        "organization_other", "political_party", "social_organization", "sports_league",
        "sports_team",
    ),
    "location": ("city", "continent", "country", "location_other", "park", "road", "state"),
    "building": ("building_other", "cultural_place", "entertainment_place", "sports_facility"),
    "art": ("art_other", "film_and_television_works", "magazine", "music", "written_work"),
    "event": ("event_other", "festival", "sports_event"),
    "product": ("brand_name_products", "game", "product_other", "software"),
    "other": ("animal", "award", "medical_thing", "ordinance", "website"),
}
FMNERG_COARSE_TYPES = tuple(FMNERG_TYPE_HIERARCHY)
FMNERG_FINE_TYPES = tuple(fine for fines in FMNERG_TYPE_HIERARCHY.values() for fine in fines)
FMNERG_COARSE_TO_GMNER = {
    "person": "PER", "organization": "ORG", "location": "LOC", "building": "LOC",
    "art": "OTHER", "event": "OTHER", "product": "OTHER", "other": "OTHER",
}
FMNERG_LABEL_SPACES = ("coarse", "fine", "gmner")

_UNSAFE_XML = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_JSONL_ROW_KEYS = {"id", "words", "text", "entities", "image", "image_size", "proposals"}
_JSONL_ENTITY_KEYS = {"start", "end", "type", "boxes", "text"}
_MAX_EXAMPLES = 5


def dataset_features():
    """The ``datasets.Features`` of a row (ARCHITECTURE.md "Dataset rows")."""
    from datasets import Features, List, Value

    box = List(Value("float32"), length=4)
    return Features(
        {
            "id": Value("string"),
            "words": List(Value("string")),
            "entities": List(
                {"start": Value("int32"), "end": Value("int32"), "type": Value("string"), "boxes": List(box)}
            ),
            "image": Value("string"),
            "image_size": List(Value("int32"), length=2),
            "proposals": List(box),
        }
    )


@dataclass
class DataReport:
    """What a reader read and repaired.

    ``counts`` holds totals (``tweets``, ``entities``, ``groundable``, ``boxes``,
    ``adjacent_entities`` = entities starting right after another, ``proposals``) and one count per
    warning kind (``orphan_inside_tags``, ``clipped_boxes``, ``degenerate_boxes``,
    ``unmatched_xml_objects``, ``missing_images``, ``unreadable_images``, ``image_size_mismatch``,
    ``missing_proposal_files``, ``dropped_proposals``, ``clipped_proposals``). ``examples`` keeps the
    first few messages of each warning kind; ``types`` counts entities per type.
    """

    source: str
    counts: Counter = field(default_factory=Counter)
    types: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    WARNING_KINDS = (
        "orphan_inside_tags",
        "clipped_boxes",
        "degenerate_boxes",
        "unmatched_xml_objects",
        "missing_images",
        "unreadable_images",
        "image_size_mismatch",
        "missing_proposal_files",
        "dropped_proposals",
        "clipped_proposals",
    )

    def warn(self, kind: str, message: str, count: int = 1) -> None:
        self.counts[kind] += count
        examples = self.examples.setdefault(kind, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(message)

    @property
    def warnings(self) -> Dict[str, int]:
        """Warning kinds that occurred, with their counts."""
        return {kind: self.counts[kind] for kind in self.WARNING_KINDS if self.counts[kind]}

    def summary(self) -> str:
        counts = self.counts
        lines = [
            f"{self.source}: {counts['tweets']} tweets, {counts['entities']} entities "
            f"({', '.join(f'{t} {n}' for t, n in sorted(self.types.items()))}), "
            f"{counts['groundable']} groundable with {counts['boxes']} boxes, "
            f"{counts['adjacent_entities']} starting right after another entity, "
            f"{counts['proposals']} proposals"
        ]
        for kind, count in self.warnings.items():
            lines.append(f"  warning: {count} {kind.replace('_', ' ')}, e.g. {self.examples[kind][0]}")
        return "\n".join(lines)

    def log_warnings(self) -> None:
        for kind, count in self.warnings.items():
            logger.warning("%s: %d %s, e.g. %s", self.source, count, kind.replace("_", " "), self.examples[kind][0])


# --------------------------------------------------------------------------------------------------
# CoNLL and BIO


def _read_conll(path: str, num_columns: int) -> Iterable[Tuple[str, int, List[str], List[List[str]], List[int]]]:
    """Yield ``(id, id_line, tokens, label_columns, token_line_numbers)`` per tweet of a CoNLL file
    (``IMGID:<id>`` line, ``num_columns`` tab-separated fields per token line, blank separators)."""
    seen: Dict[str, int] = {}
    current = None

    def finish():
        sample_id, id_line, tokens, labels, lines = current
        if not tokens:
            raise ValueError(f"{path}:{id_line}: tweet {sample_id!r} has no token lines")
        return sample_id, id_line, tokens, labels, lines

    for line_number, line in utf8_lines(path):
        line = line.rstrip("\r\n")
        if line.startswith("IMGID:"):
            if current is not None:
                yield finish()
            sample_id = line[len("IMGID:"):].strip()
            if not sample_id:
                raise ValueError(f"{path}:{line_number}: empty id in {line!r}")
            if sample_id in seen:
                raise ValueError(
                    f"{path}:{line_number}: id {sample_id!r} already used at line {seen[sample_id]}; "
                    "ids must be unique"
                )
            seen[sample_id] = line_number
            current = (sample_id, line_number, [], [[] for _ in range(num_columns - 1)], [])
            continue
        if not line.strip():
            if current is not None:
                yield finish()
                current = None
            continue
        fields = line.split("\t")
        if current is None:
            raise ValueError(
                f"{path}:{line_number}: token line {line!r} outside a tweet; every tweet starts "
                "with an 'IMGID:<id>' line"
            )
        if len(fields) != num_columns or not all(fields):
            raise ValueError(
                f"{path}:{line_number}: malformed line {line!r}: expected {num_columns} non-empty "
                f"tab-separated fields (token{', tag' * (num_columns - 1)}), found {len(fields)}"
            )
        current[2].append(fields[0])
        for column, label in zip(current[3], fields[1:]):
            column.append(label)
        current[4].append(line_number)
    if current is not None:
        yield finish()


def _split_tag(tag: str, path: str, line_number: int) -> Tuple[str, Optional[str]]:
    if tag == "O":
        return "O", None
    prefix, separator, entity_type = tag.partition("-")
    if not separator or prefix not in ("B", "I") or not entity_type:
        raise ValueError(f"{path}:{line_number}: malformed tag {tag!r}; expected O, B-<type> or I-<type>")
    return prefix, entity_type


def decode_bio(
    tags: Sequence[str],
    line_numbers: Sequence[int],
    path: str,
    label_space: Optional[Iterable[str]],
    report: DataReport,
) -> List[Tuple[int, int, str]]:
    """BIO tags → ``(start, end, type)`` spans (inclusive end).

    ``B-X`` always opens a new entity; an ``I-X`` that does not continue an open ``X`` entity is read
    as ``B-X`` and counted in ``report`` (``orphan_inside_tags``). A type outside ``label_space``
    (when given) raises ``ValueError`` naming ``path`` and the line.
    """
    allowed = None if label_space is None else set(label_space)
    spans: List[Tuple[int, int, str]] = []
    open_start, open_type = -1, None
    for index, (tag, line_number) in enumerate(zip(tags, line_numbers)):
        prefix, entity_type = _split_tag(tag, path, line_number)
        if prefix == "O":
            if open_type is not None:
                spans.append((open_start, index - 1, open_type))
                open_type = None
            continue
        if allowed is not None and entity_type not in allowed:
            raise ValueError(
                f"{path}:{line_number}: unknown entity type {entity_type!r} in tag {tag!r}; the label "
                f"space is {sorted(allowed)}"
            )
        if prefix == "I" and open_type == entity_type:
            continue
        if prefix == "I":
            report.warn(
                "orphan_inside_tags",
                f"{path}:{line_number}: {tag!r} does not continue an entity of that type; read as B-{entity_type}",
            )
        if open_type is not None:
            spans.append((open_start, index - 1, open_type))
        open_start, open_type = index, entity_type
    if open_type is not None:
        spans.append((open_start, len(tags) - 1, open_type))
    return spans


def _check_fmnerg_columns(coarse: Sequence[str], fine: Sequence[str], lines: Sequence[int], path: str) -> None:
    """The fine column must tag the same spans as the coarse column, with a fine type of that coarse type."""
    for coarse_tag, fine_tag, line_number in zip(coarse, fine, lines):
        coarse_prefix, coarse_type = _split_tag(coarse_tag, path, line_number)
        fine_prefix, fine_type = _split_tag(fine_tag, path, line_number)
        for entity_type, space in ((coarse_type, FMNERG_COARSE_TYPES), (fine_type, FMNERG_FINE_TYPES)):
            if entity_type is not None and entity_type not in space:
                raise ValueError(
                    f"{path}:{line_number}: unknown entity type {entity_type!r}; Twitter-FMNERG types "
                    f"are {sorted(space)}"
                )
        if coarse_prefix != fine_prefix or (
            coarse_type is not None and fine_type not in FMNERG_TYPE_HIERARCHY[coarse_type]
        ):
            raise ValueError(
                f"{path}:{line_number}: fine tag {fine_tag!r} does not refine coarse tag {coarse_tag!r}"
            )


# --------------------------------------------------------------------------------------------------
# Pascal VOC xml


@functools.lru_cache(maxsize=None)
def _xml_module():
    """defusedxml's ElementTree when installed (an optional extra), else the standard library's
    (safe here because documents declaring a DTD or entities are refused before parsing)."""
    try:
        from defusedxml import ElementTree as SafeElementTree
    except ImportError:
        return ElementTree
    return SafeElementTree


def _parse_xml_bytes(data: bytes, path: str):
    if _UNSAFE_XML.search(data):
        raise ValueError(
            f"{path}: the xml declares a DTD or entities (<!DOCTYPE / <!ENTITY), which is refused for "
            "safety; Pascal VOC annotations need neither, remove the declaration"
        )
    try:
        return _xml_module().fromstring(data)
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: not well-formed xml ({error})") from None
    except ValueError as error:  # defusedxml's refusals (DTDForbidden, EntitiesForbidden, ...)
        raise ValueError(f"{path}: refused xml ({error})") from None


def read_voc_xml(path: str) -> Tuple[Optional[Tuple[int, int]], List[Tuple[str, Tuple[float, float, float, float]]]]:
    """Read a Pascal VOC file → ``(image_size or None, [(object name, (x1, y1, x2, y2)), ...])``.

    ``image_size`` is ``(width, height)`` from ``<size>`` when both are positive integers. Raises
    ``ValueError`` naming the file for xml that is malformed, declares a DTD/entities, or has an
    object without a name or a complete numeric ``<bndbox>``.
    """
    with open(path, "rb") as handle:
        root = _parse_xml_bytes(handle.read(), path)
    image_size = None
    size = root.find("size")
    if size is not None:
        try:
            width, height = int(size.findtext("width", "")), int(size.findtext("height", ""))
        except ValueError:
            width = height = 0
        if width > 0 and height > 0:
            image_size = (width, height)
    objects = []
    for number, element in enumerate(root.iter("object"), start=1):
        name = (element.findtext("name") or "").strip()
        if not name:
            raise ValueError(f"{path}: <object> #{number} has no <name>")
        bndbox = element.find("bndbox")
        try:
            box = tuple(float(bndbox.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise ValueError(
                f"{path}: <object> #{number} ({name!r}) needs a <bndbox> with numeric xmin, ymin, xmax, ymax"
            ) from None
        if not is_finite_box(box):
            raise ValueError(f"{path}: <object> #{number} ({name!r}) has a non-finite box {box}")
        objects.append((name, box))
    return image_size, objects


# --------------------------------------------------------------------------------------------------
# Row assembly shared by the readers


def _clean_boxes(
    boxes: Iterable[Sequence[float]], image_size: Optional[Sequence[int]], where: str, report: DataReport
) -> List[List[float]]:
    """Clip annotated boxes to the image (counted) and remove degenerate ones (counted)."""
    cleaned = []
    for box in boxes:
        box = tuple(float(v) for v in box)
        if image_size is not None:
            clipped = clip_box(box, image_size[0], image_size[1])
            if clipped != box:
                report.warn("clipped_boxes", f"{where}: box {list(box)} clipped to the image {list(image_size)}")
            box = clipped
        if is_degenerate(box):
            report.warn("degenerate_boxes", f"{where}: box {list(box)} is degenerate (after clipping); removed")
            continue
        cleaned.append(list(box))
    return cleaned


def _resolve_image(
    image_path: Optional[str], image_size: Optional[Sequence[int]], sample_id: str, report: DataReport
) -> Tuple[Optional[str], Optional[Tuple[int, int]]]:
    """Check the image file: ``(path or None, image_size)``; missing / unreadable files are counted."""
    if image_path is None:
        return None, None if image_size is None else tuple(image_size)
    if not os.path.isfile(image_path):
        report.warn("missing_images", f"{sample_id}: image {image_path} not found")
        return None, None if image_size is None else tuple(image_size)
    try:
        file_size = upright_image_size(image_path)  # the header only; EXIF orientation applied
    except ValueError as error:
        report.warn("unreadable_images", f"{sample_id}: image {image_path} unreadable ({error})")
        return None, None if image_size is None else tuple(image_size)
    if image_size is not None and tuple(image_size) != tuple(file_size):
        report.warn(
            "image_size_mismatch",
            f"{sample_id}: annotated size {list(image_size)} differs from the image file's {list(file_size)}; "
            "the annotated size is kept (boxes are in its pixels)",
        )
        return os.path.abspath(image_path), tuple(image_size)
    return os.path.abspath(image_path), tuple(file_size)


def _vinvl_proposals(
    vinvl_dir: Optional[str], sample_id: str, image_size, top_k: int, report: DataReport, path: Optional[str] = None
) -> List[List[float]]:
    """The top-k proposals of ``<vinvl_dir>/<sample_id>.jpg.npz`` (or of ``path``), missing files counted."""
    if vinvl_dir is None:
        return []
    path = path or vinvl_file(vinvl_dir, sample_id)
    if not os.path.isfile(path):
        report.warn("missing_proposal_files", f"{sample_id}: {path} not found; no proposals")
        return []
    proposals = load_vinvl_proposals(path, top_k=top_k, image_size=image_size)
    dropped = sum(proposals.dropped.values())
    if dropped:
        report.warn("dropped_proposals", f"{path}: dropped {proposals.dropped}", count=dropped)
    if proposals.num_clipped:
        report.warn("clipped_proposals", f"{path}: {proposals.num_clipped} boxes clipped", count=proposals.num_clipped)
    return proposals.boxes.tolist()


def _make_row(
    sample_id: str,
    words: List[str],
    spans: List[Tuple[int, int, str]],
    boxes_of: Mapping[int, List[List[float]]],
    image: Optional[str],
    image_size,
    proposals: List[List[float]],
    report: DataReport,
) -> Dict[str, Any]:
    entities = []
    ends = {end for _, end, _ in spans}
    for index, (start, end, entity_type) in enumerate(spans):
        boxes = boxes_of.get(index, [])
        entities.append({"start": start, "end": end, "type": entity_type, "boxes": boxes})
        report.types[entity_type] += 1
        report.counts["adjacent_entities"] += (start - 1) in ends
        report.counts["groundable"] += bool(boxes)
        report.counts["boxes"] += len(boxes)
    report.counts["tweets"] += 1
    report.counts["entities"] += len(entities)
    report.counts["proposals"] += len(proposals)
    return {
        "id": sample_id,
        "words": words,
        "entities": entities,
        "image": image,
        "image_size": None if image_size is None else list(image_size),
        "proposals": proposals,
    }


def _to_dataset(rows: List[Dict[str, Any]], report: DataReport):
    import pyarrow
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    report.log_warnings()
    features = dataset_features()
    # The rows are already typed: building the Arrow table directly is ~6x faster than
    # Dataset.from_list's per-example encoding (all of train in < 10 s with room to spare).
    table = pyarrow.Table.from_pylist(rows, schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features))


# --------------------------------------------------------------------------------------------------
# Twitter-GMNER and Twitter-FMNERG


def _read_conll_dataset(
    txt_path: str,
    num_columns: int,
    spans_of,
    xml_dir: Optional[str],
    images_dir: Optional[str],
    vinvl_dir: Optional[str],
    top_k: int,
    report: DataReport,
):
    for name, folder in (("xml", xml_dir), ("images", images_dir), ("VinVL", vinvl_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"the {name} folder {folder} does not exist")
    xml_files = set(os.listdir(xml_dir)) if xml_dir is not None else set()
    rows = []
    for sample_id, id_line, tokens, labels, lines in _read_conll(txt_path, num_columns):
        spans = spans_of(labels, lines)
        image_size, objects = None, []
        if f"{sample_id}.xml" in xml_files:
            xml_path = os.path.join(xml_dir, f"{sample_id}.xml")
            image_size, objects = read_voc_xml(xml_path)
        else:
            xml_path = None
        image_path = None if images_dir is None else os.path.join(images_dir, f"{sample_id}.jpg")
        image, image_size = _resolve_image(image_path, image_size, sample_id, report)

        boxes_by_name: Dict[str, List[Tuple[float, ...]]] = {}
        for name, box in objects:
            boxes_by_name.setdefault(name, []).append(box)
        # Two mentions with one surface string share its boxes (the release cannot tell them apart).
        surfaces = [" ".join(tokens[start : end + 1]) for start, end, _ in spans]
        cleaned = {
            name: _clean_boxes(boxes, image_size, xml_path, report)
            for name, boxes in boxes_by_name.items()
            if name in surfaces
        }
        boxes_of = {index: [list(b) for b in cleaned[s]] for index, s in enumerate(surfaces) if s in cleaned}
        for name, boxes in boxes_by_name.items():
            if name not in cleaned:
                report.warn(
                    "unmatched_xml_objects",
                    f"{xml_path}: object name {name!r} is the surface string of no entity of tweet "
                    f"{sample_id!r} ({txt_path}:{id_line}); its {len(boxes)} box(es) are not used",
                    count=len(boxes),
                )
        proposals = _vinvl_proposals(vinvl_dir, sample_id, image_size, top_k, report)
        rows.append(_make_row(sample_id, tokens, spans, boxes_of, image, image_size, proposals, report))
    return _to_dataset(rows, report), report


def load_twitter_gmner(
    txt_path: str,
    xml_dir: Optional[str] = None,
    images_dir: Optional[str] = None,
    vinvl_dir: Optional[str] = None,
    top_k: int = DEFAULT_MAX_REGIONS,
    entity_types: Sequence[str] = GMNER_TYPES,
):
    """Read one Twitter-GMNER split (module docstring) → ``(datasets.Dataset, DataReport)``.

    Args:
        txt_path: the CoNLL file, e.g. ``twitter-gmner/train.txt``.
        xml_dir: the Pascal VOC folder (``<id>.xml``); None = no boxes.
        images_dir: the image folder (``<id>.jpg``); the ``image`` column is the file's absolute
            path when it exists, else None (counted in the report).
        vinvl_dir: the VinVL folder (``<id>.jpg.npz``) for the ``proposals`` column.
        top_k: proposals kept per image.
        entity_types: the label space; another type is an error naming the file and line.
    """
    report = DataReport(source=txt_path)
    return _read_conll_dataset(
        txt_path,
        2,
        lambda labels, lines: decode_bio(labels[0], lines, txt_path, entity_types, report),
        xml_dir,
        images_dir,
        vinvl_dir,
        top_k,
        report,
    )


def load_twitter_fmnerg(
    txt_path: str,
    xml_dir: Optional[str] = None,
    label_space: str = "coarse",
    images_dir: Optional[str] = None,
    vinvl_dir: Optional[str] = None,
    top_k: int = DEFAULT_MAX_REGIONS,
):
    """Read one Twitter-FMNERG split → ``(datasets.Dataset, DataReport)``.

    ``label_space``: ``"coarse"`` (8 types), ``"fine"`` (51) or ``"gmner"`` (coarse mapped to
    PER/LOC/ORG/OTHER). ``xml_dir`` is the Twitter-GMNER xml folder (FMNERG re-uses it); the other
    arguments are those of ``load_twitter_gmner``. Every token's fine tag must refine its coarse
    tag (same B/I/O, a fine type of that coarse type), else ``ValueError`` naming file and line.
    """
    if label_space not in FMNERG_LABEL_SPACES:
        raise ValueError(f"label_space must be one of {FMNERG_LABEL_SPACES}, got {label_space!r}")
    report = DataReport(source=f"{txt_path} ({label_space})")

    def spans_of(labels, lines):
        coarse, fine = labels
        _check_fmnerg_columns(coarse, fine, lines, txt_path)
        if label_space == "fine":
            return decode_bio(fine, lines, txt_path, FMNERG_FINE_TYPES, report)
        spans = decode_bio(coarse, lines, txt_path, FMNERG_COARSE_TYPES, report)
        if label_space == "gmner":
            spans = [(start, end, FMNERG_COARSE_TO_GMNER[t]) for start, end, t in spans]
        return spans

    return _read_conll_dataset(txt_path, 3, spans_of, xml_dir, images_dir, vinvl_dir, top_k, report)


# --------------------------------------------------------------------------------------------------
# JSONL


def _jsonl_row(
    row: Any, where: str, folder: str, entity_types, top_k: int, report: DataReport, vinvl_dir: Optional[str] = None
) -> Dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(row).__name__}")
    unknown = set(row) - _JSONL_ROW_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_JSONL_ROW_KEYS)}")
    if "id" not in row or not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise ValueError(f"{where}: needs an 'id' (string)")
    sample_id = str(row["id"])
    if ("words" in row) == ("text" in row):
        raise ValueError(f"{where}: give exactly one of 'words' (a list of strings) or 'text' (a string)")
    if "words" in row:
        words = row["words"]
        if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
            raise ValueError(f"{where}: 'words' must be a list of non-empty strings")
    else:
        if not isinstance(row["text"], str):
            raise ValueError(f"{where}: 'text' must be a string")
        words = split_words(row["text"])[0]  # the rule raw strings get at inference
    if not words:
        raise ValueError(f"{where}: sample {sample_id!r} has no words")
    if "entities" not in row or not isinstance(row["entities"], list):
        raise ValueError(f"{where}: needs 'entities', a list (empty when the sample has none)")

    image = image_size = None
    if row.get("image_size") is not None:
        size = row["image_size"]
        if not (isinstance(size, list) and len(size) == 2 and all(is_index(v) and v > 0 for v in size)):
            raise ValueError(f"{where}: 'image_size' must be [width, height] of positive integers, got {size!r}")
        image_size = tuple(size)
    if row.get("image") is not None:
        if not isinstance(row["image"], str):
            raise ValueError(f"{where}: 'image' must be a path string")
        image, image_size = _resolve_image(os.path.join(folder, row["image"]), image_size, sample_id, report)

    spans, boxes_of = [], {}
    for number, entity in enumerate(row["entities"]):
        at = f"{where}: entity {number}"
        if not isinstance(entity, dict):
            raise ValueError(f"{at}: expected an object, got {entity!r}")
        unknown = set(entity) - _JSONL_ENTITY_KEYS
        if unknown:
            raise ValueError(f"{at}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_JSONL_ENTITY_KEYS)}")
        parsed = parse_entity(entity, at, num_words=len(words), entity_types=entity_types)
        start, end, entity_type = parsed["start"], parsed["end"], parsed["type"]
        surface = " ".join(words[start : end + 1])
        if "text" in entity and entity["text"] != surface:
            raise ValueError(f"{at}: 'text' is {entity['text']!r} but words {start}..{end} are {surface!r}")
        boxes_of[number] = _clean_boxes(parsed["boxes"], image_size, at, report)
        spans.append((start, end, entity_type))

    proposals = []
    if row.get("proposals") is not None:
        if not isinstance(row["proposals"], list):
            raise ValueError(f"{where}: 'proposals' must be a list of [x1, y1, x2, y2]")
        boxes = [parse_box(b, f"{where}: proposals") for b in row["proposals"]]
        width, height = image_size if image_size is not None else (None, None)
        kept, dropped = sanitize_boxes(boxes, width, height, top_k=top_k)
        if dropped:
            report.warn("dropped_proposals", f"{where}: {dropped} degenerate or duplicate proposals dropped", dropped)
        proposals = [list(box) for box in kept]
        if vinvl_dir is not None:
            raise ValueError(
                f"{where}: the row has 'proposals' and a proposals folder ({vinvl_dir}) was given too; remove one "
                "(the folder's <image file name>.npz files would replace the row's boxes)"
            )
    elif vinvl_dir is not None and row.get("image") is not None:
        npz = os.path.join(vinvl_dir, os.path.basename(row["image"]) + ".npz")
        proposals = _vinvl_proposals(vinvl_dir, sample_id, image_size, top_k, report, path=npz)
    return _make_row(sample_id, words, spans, boxes_of, image, image_size, proposals, report)


def load_jsonl(
    path: str,
    entity_types: Optional[Sequence[str]] = None,
    top_k: int = DEFAULT_MAX_REGIONS,
    vinvl_dir: Optional[str] = None,
):
    """Read the JSONL format of the module docstring → ``(datasets.Dataset, DataReport)``.

    ``entity_types``: the label space (None accepts any type string). Errors name the file and the
    line; ``image`` paths are relative to the file's folder. ``vinvl_dir``: a folder of VinVL-layout
    proposal files named ``<image file name>.npz`` (``processing/propose_regions.py`` writes them): a
    row with an ``image`` takes its proposals from ``<vinvl_dir>/<basename of image>.npz`` (a missing
    file is counted in ``missing_proposal_files``); a row that also has ``proposals`` is an error.
    """
    if vinvl_dir is not None and not os.path.isdir(vinvl_dir):
        raise FileNotFoundError(f"the proposals folder {vinvl_dir} does not exist")
    report = DataReport(source=path)
    folder = os.path.dirname(os.path.abspath(path))
    rows, seen = [], {}
    for line_number, line in utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        parsed = _jsonl_row(parse_json_line(line, where), where, folder, entity_types, top_k, report, vinvl_dir)
        if parsed["id"] in seen:
            raise ValueError(f"{where}: id {parsed['id']!r} already used at line {seen[parsed['id']]}")
        seen[parsed["id"]] = line_number
        rows.append(parsed)
    return _to_dataset(rows, report), report


# --------------------------------------------------------------------------------------------------
# References for the evaluation


def write_references_jsonl(rows: Iterable[Mapping[str, Any]], path: str, include_proposals: bool = False) -> int:
    """Write the evaluation references (ARCHITECTURE.md "Evaluation JSONL") of dataset rows:
    ``{"id", "entities": [{"start", "end", "type", "boxes"}]}`` per tweet, plus ``"proposals"`` when
    ``include_proposals`` (lets the evaluation count entities no proposal covers). Returns the number
    of rows written."""
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            reference = {
                "id": row["id"],
                "entities": [
                    {"start": e["start"], "end": e["end"], "type": e["type"], "boxes": [list(b) for b in e["boxes"]]}
                    for e in row["entities"]
                ],
            }
            if include_proposals:
                reference["proposals"] = [list(b) for b in row["proposals"]]
            handle.write(json.dumps(reference) + "\n")
            written += 1
    return written
