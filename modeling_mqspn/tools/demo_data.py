"""A deterministic synthetic Twitter-GMNER release: the demo data.

The real benchmark's images and VinVL detections are distributed through cloud drives, so the
package makes its own small release, entirely by code from a seed, in the real layout
(docs/DESIGN.md §10.1–10.3):

- ``train.txt``, ``dev.txt``, ``test.txt``: CoNLL, an ``IMGID:<id>`` line, one ``token<TAB>BIO``
  line per token over PER / LOC / ORG / OTHER, one blank line after each tweet;
- ``xml/<id>.xml``: Pascal VOC, ``<size>`` and one ``<object>`` per gold box whose ``<name>`` is
  the entity's tokens joined by single spaces; only for tweets with at least one groundable entity;
- ``images/<id>.jpg``: the tweet image (JPEG);
- ``vinvl/<id>.jpg.npz``: uncompressed npz with ``num_boxes`` (int64 scalar), ``bounding_boxes``
  (float32 (N, 4), x1 y1 x2 y2 pixels, sorted by descending score), ``scores`` (float32 (N,)),
  ``image_h``, ``image_w``;
- ``demo_catalogue.json``: the entity catalogue (name, type, appearance) — not part of the real
  layout, the readers ignore it.

Grounding depends on the pixels. Every catalogue entity has one appearance (a shape in a primary
colour that no other entity has, with a pattern in a secondary colour) that it keeps in every
image. An image shows some of the tweet's entities (the others are ungroundable: region
None), plus distractors (entities the tweet does not mention). The proposals are jittered copies
of every drawn object's box (IoU ≥ 0.5 with it) and background boxes, ordered by a random fake
score, so a proposal's rank says nothing: only its appearance tells which entity it shows.

The text comes from templates whose context words hint at the entity types; names are made from
syllables and carry type cues too (``Lake …``, ``… United``). Same seed and config give
byte-identical files (the JPEG encoder, the npz zip entries' timestamps and the xml formatting are
all fixed).
"""

from __future__ import annotations

import colorsys
import concurrent.futures
import functools
import io
import json
import os
import random
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..box_ops import box_iou, max_iou

__all__ = [
    "CATALOGUE_FILE",
    "CatalogueEntity",
    "DemoDataConfig",
    "ENTITY_TYPES",
    "MAX_SLOTS",
    "PALETTE",
    "PATTERNS",
    "RELEASE_ENTRIES",
    "SHAPES",
    "SPLITS",
    "generate_demo_release",
    "make_catalogue",
    "make_tweet",
]

ENTITY_TYPES = ("PER", "LOC", "ORG", "OTHER")
SPLITS = ("train", "dev", "test")
CATALOGUE_FILE = "demo_catalogue.json"
# What ``generate_demo_release`` writes (and removes first when overwriting).
RELEASE_ENTRIES = ("train.txt", "dev.txt", "test.txt", "xml", "images", "vinvl", CATALOGUE_FILE)


def _make_palette() -> Dict[str, Tuple[int, int, int]]:
    """26 saturated colours: 12 hues, each bright and dark, plus white and black. The image
    backgrounds are muted (grey-ish), so no entity colour looks like background."""
    palette: Dict[str, Tuple[int, int, int]] = {}
    for hue in range(0, 360, 30):
        for shade, saturation, value in (("bright", 0.85, 0.95), ("dark", 0.9, 0.5)):
            rgb = colorsys.hsv_to_rgb(hue / 360.0, saturation, value)
            palette[f"hue{hue}-{shade}"] = tuple(int(round(255 * c)) for c in rgb)
    palette["white"] = (248, 248, 248)
    palette["black"] = (15, 15, 15)
    return palette


PALETTE: Dict[str, Tuple[int, int, int]] = _make_palette()
SHAPES = ("ellipse", "rectangle", "triangle", "diamond")
PATTERNS = ("hstripes", "vstripes", "dot", "border", "cross")

_SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "sel", "da", "rin", "bo", "ne", "vi", "sha", "gor",
    "lu", "tem", "fa", "zo", "quin", "mar", "el", "do", "ris", "an", "ju", "kel", "ta", "om",
)
_NAME_FORMS = {
    "PER": ("{A} {B}", "{A} {B}", "{A}", "{A} {B} {C}"),
    "LOC": ("{A}", "Lake {A}", "Port {A}", "{A} City", "{A} Valley", "Mount {A}"),
    "ORG": ("{A} United", "{A} Labs", "FC {A}", "{A} Records", "{A} News", "{A} Airlines"),
    "OTHER": ("{A} Cup", "{A} Phone", "{A} Fest", "Operation {A}", "{A} Awards"),
}

# Templates: tokens separated by spaces; ``{PER}`` etc. are entity slots, ``a|b|c`` picks one word,
# ``@user`` a random handle, ``#tag`` a hashtag (split into ``#`` and the word, as in the release),
# ``URL`` a split t.co link.
_TEMPLATES: Tuple[str, ...] = (
    "{PER} scored|netted twice in the final tonight|yesterday",
    "great|lovely|long interview with {PER} this morning|afternoon",
    "happy birthday {PER} ! have a great|wonderful day",
    "{PER} and {PER} on stage together tonight",
    "so proud of {PER} for winning|finishing the race",
    "{PER} says|claims the new season starts soon",
    "sunset|sunrise over {LOC} tonight|today",
    "flooding|snow reported in {LOC} after the storm",
    "road trip from {LOC} to {LOC} this weekend",
    "beautiful|rainy|busy day in {LOC} !",
    "just landed in {LOC} , hello|finally",
    "{ORG} announced|confirmed a new deal|partnership today",
    "{ORG} fans celebrate|cheer after the match",
    "breaking : {ORG} cuts|adds 200 jobs",
    "huge|big win for {ORG} last night",
    "watching|streaming {OTHER} with friends",
    "tickets for {OTHER} are sold out|on sale",
    "who else is excited for {OTHER} ?",
    "{OTHER} was amazing|awful this year",
    "{PER} signs|signed with {ORG} in {LOC}",
    "{PER} visits|tours {LOC} ahead of {OTHER}",
    "{ORG} opens|closes its office in {LOC}",
    "{PER} joins {ORG} before|after {OTHER}",
    "{PER} of {ORG} speaks|spoke at {OTHER} in {LOC}",
    "{LOC} hosts|welcomes {OTHER} next week|month",
    "{PER} meets {PER} in {LOC}",
    "{ORG} and {ORG} clash|meet in {LOC} tonight",
    "what a day lol",
    "can't sleep again|tonight ...",
    "monday mood : coffee and more coffee",
)
MAX_SLOTS = max(t.count("{") for t in _TEMPLATES)


@dataclass(frozen=True)
class DemoDataConfig:
    """Sizes and rates of the demo release; the defaults make a small, learnable but not trivial
    set (about a third of the mentioned entities are absent from their image)."""

    num_train: int = 240
    num_dev: int = 60
    num_test: int = 60
    entities_per_type: int = 6
    min_image_size: int = 64
    max_image_size: int = 128
    groundable_rate: float = 0.65  # P(a mentioned entity is drawn in the image)
    max_distractors: int = 2  # unmentioned catalogue entities drawn per image, 0..max
    second_instance_rate: float = 0.1  # P(a drawn entity is drawn twice: two boxes, one name)
    max_proposals: int = 18  # cap on proposals per image (MQSPN's k)
    missed_detection_rate: float = 0.0  # P(no proposal covers a drawn object): incomplete coverage
    min_background_proposals: int = 3
    max_background_proposals: int = 8
    jpeg_quality: int = 92

    def validate(self) -> None:
        for name in ("num_train", "num_dev", "num_test", "max_distractors",
                     "min_background_proposals", "max_background_proposals"):
            if getattr(self, name) < 0:
                raise ValueError(f"DemoDataConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.entities_per_type < 3:
            raise ValueError(
                f"DemoDataConfig.entities_per_type must be >= 3 (templates need up to 2 distinct "
                f"entities of a type plus distractors), got {self.entities_per_type}"
            )
        if self.entities_per_type * len(ENTITY_TYPES) > len(PALETTE):
            raise ValueError(
                f"DemoDataConfig.entities_per_type={self.entities_per_type} needs more primary "
                f"colours than the palette has ({len(PALETTE)}); use at most "
                f"{len(PALETTE) // len(ENTITY_TYPES)}"
            )
        if not 32 <= self.min_image_size <= self.max_image_size:
            raise ValueError(
                f"DemoDataConfig needs 32 <= min_image_size <= max_image_size, got "
                f"{self.min_image_size}, {self.max_image_size}"
            )
        for name in ("groundable_rate", "second_instance_rate", "missed_detection_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DemoDataConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_background_proposals > self.max_background_proposals:
            raise ValueError("DemoDataConfig.min_background_proposals > max_background_proposals")
        most_objects = 2 * MAX_SLOTS + self.max_distractors  # each mention twice + distractors
        if self.max_proposals < most_objects:
            raise ValueError(
                f"DemoDataConfig.max_proposals must be >= {most_objects} (2 x {MAX_SLOTS} mentions "
                f"+ max_distractors) so every drawn object keeps a proposal, got {self.max_proposals}"
            )
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"DemoDataConfig.jpeg_quality must be in [1, 95], got {self.jpeg_quality}")


@dataclass(frozen=True)
class CatalogueEntity:
    name: str  # tokens joined by single spaces (the xml <name>)
    type: str
    shape: str
    pattern: str
    primary: str  # PALETTE keys
    secondary: str

    @property
    def tokens(self) -> List[str]:
        return self.name.split(" ")


def _make_word(rng: random.Random, num_syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(num_syllables)).capitalize()


def make_catalogue(seed: int, entities_per_type: int) -> List[CatalogueEntity]:
    """The entity catalogue: ``entities_per_type`` names per type, each with its own primary colour
    (it covers most of the shape, so it identifies the entity) and a secondary pattern colour."""
    rng = random.Random(f"mqspn-demo:{seed}:catalogue")
    primaries = rng.sample(list(PALETTE), entities_per_type * len(ENTITY_TYPES))
    catalogue: List[CatalogueEntity] = []
    used_names, used_words = set(), set()
    for entity_type in ENTITY_TYPES:
        made = 0
        while made < entities_per_type:
            form = rng.choice(_NAME_FORMS[entity_type])
            words = {key: _make_word(rng, rng.choice((2, 2, 3))) for key in ("A", "B", "C")}
            name = form.format(**words)
            core_words = [words[k] for k in ("A", "B", "C") if "{%s}" % k in form]
            # Every syllable word belongs to one entity, so no name is part of another.
            if name in used_names or len(set(core_words)) < len(core_words) or any(
                w in used_words for w in core_words
            ):
                continue
            used_words.update(core_words)
            used_names.add(name)
            primary = primaries[len(catalogue)]
            secondary = rng.choice([c for c in PALETTE if c != primary])
            catalogue.append(
                CatalogueEntity(
                    name=name,
                    type=entity_type,
                    shape=rng.choice(SHAPES),
                    pattern=rng.choice(PATTERNS),
                    primary=primary,
                    secondary=secondary,
                )
            )
            made += 1
    return catalogue


def _tweet_id(split: str, index: int) -> str:
    """Ids in the three styles of the release (plain number, ``16_05_…``, ``O_…``), unique per
    split and independent of the other splits' sizes."""
    number = (SPLITS.index(split) + 1) * 100000 + index
    style = index % 3
    if style == 0:
        return str(number)
    if style == 1:
        return f"16_05_{number}"
    return f"O_{number}"


def _handle(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9))) + str(
        rng.randint(0, 99)
    )


def _make_sentence(
    rng: random.Random, catalogue: Sequence[CatalogueEntity]
) -> Tuple[List[str], List[str], List[CatalogueEntity]]:
    """Tokens, BIO tags and the mentioned entities (in order) of one tweet."""
    template = rng.choice(_TEMPLATES)
    by_type = {t: [e for e in catalogue if e.type == t] for t in ENTITY_TYPES}
    slots = [piece[1:-1] for piece in template.split(" ") if piece.startswith("{")]
    chosen: Dict[str, List[CatalogueEntity]] = {
        t: rng.sample(by_type[t], slots.count(t)) for t in ENTITY_TYPES
    }
    tokens: List[str] = []
    tags: List[str] = []
    mentioned: List[CatalogueEntity] = []
    if rng.random() < 0.3:
        tokens += ["RT", "@", _handle(rng), ":"]
        tags += ["O"] * 4
    for piece in template.split(" "):
        if piece.startswith("{"):
            entity = chosen[piece[1:-1]].pop(0)
            mentioned.append(entity)
            tokens += entity.tokens
            tags += [f"B-{entity.type}"] + [f"I-{entity.type}"] * (len(entity.tokens) - 1)
        else:
            tokens.append(rng.choice(piece.split("|")))
            tags.append("O")
    if rng.random() < 0.3:
        tokens += ["#", rng.choice(("love", "news", "tbt", "live", "weekend", "wow"))]
        tags += ["O", "O"]
    if rng.random() < 0.25:
        tokens += ["http", ":", "//t.co/" + _handle(rng)]
        tags += ["O", "O", "O"]
    return tokens, tags, mentioned


def _draw_entity(image: Image.Image, entity: CatalogueEntity, box: Tuple[int, int, int, int]) -> None:
    """Draw the entity's appearance filling ``box`` exactly (the gold box is the shape's extent)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    tile = Image.new("RGB", (w, h), PALETTE[entity.primary])
    pen = ImageDraw.Draw(tile)
    second = PALETTE[entity.secondary]
    step = max(4, min(w, h) // 4)
    if entity.pattern == "hstripes":
        for y in range(step // 2, h, step):
            pen.rectangle((0, y, w, y + step // 4), fill=second)
    elif entity.pattern == "vstripes":
        for x in range(step // 2, w, step):
            pen.rectangle((x, 0, x + step // 4, h), fill=second)
    elif entity.pattern == "dot":
        pen.ellipse((w * 0.3, h * 0.3, w * 0.7, h * 0.7), fill=second)
    elif entity.pattern == "border":
        pen.rectangle((w * 0.2, h * 0.2, w * 0.8, h * 0.8), outline=second, width=max(2, step // 2))
    else:  # cross
        pen.rectangle((w * 0.4, 0, w * 0.6, h), fill=second)
        pen.rectangle((0, h * 0.4, w, h * 0.6), fill=second)
    mask = Image.new("L", (w, h), 0)
    outline = ImageDraw.Draw(mask)
    if entity.shape == "ellipse":
        outline.ellipse((0, 0, w - 1, h - 1), fill=255)
    elif entity.shape == "rectangle":
        outline.rectangle((0, 0, w - 1, h - 1), fill=255)
    elif entity.shape == "triangle":
        outline.polygon([(w / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    else:  # diamond
        outline.polygon([(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)], fill=255)
    image.paste(tile, (x1, y1), mask)


def _place(rng: random.Random, width: int, height: int, placed: List[Tuple[int, int, int, int]]):
    """A box for one object that does not touch the already placed ones, or None."""
    short = min(width, height)
    for _ in range(60):
        w = rng.randint(int(short * 0.24), int(short * 0.42))
        h = max(8, min(height - 2, int(w * rng.uniform(0.75, 1.35))))
        x1 = rng.randint(0, width - w)
        y1 = rng.randint(0, height - h)
        box = (x1, y1, x1 + w, y1 + h)
        if all(
            box[2] + 2 <= other[0] or other[2] + 2 <= box[0] or box[3] + 2 <= other[1] or other[3] + 2 <= box[1]
            for other in placed
        ):
            return box
    return None


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A noisy two-colour gradient; muted so it never looks like an entity's saturated colours."""
    top = rng.integers(60, 160, size=3)
    bottom = rng.integers(60, 160, size=3)
    t = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = top[None, None, :] * (1 - t) + bottom[None, None, :] * t
    pixels = np.broadcast_to(pixels, (height, width, 3)) + rng.normal(0.0, 12.0, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _jitter(rng: random.Random, box, width: int, height: int) -> Tuple[float, float, float, float]:
    """A detector-like copy of ``box`` (each side moved by up to 8 % of the box size): IoU ≥ 0.55
    with it, inside the image, float coordinates."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    for _ in range(50):
        cand = (
            min(max(x1 + rng.uniform(-0.08, 0.08) * w, 0.0), width),
            min(max(y1 + rng.uniform(-0.08, 0.08) * h, 0.0), height),
            min(max(x2 + rng.uniform(-0.08, 0.08) * w, 0.0), width),
            min(max(y2 + rng.uniform(-0.08, 0.08) * h, 0.0), height),
        )
        if cand[2] - cand[0] >= 4 and cand[3] - cand[1] >= 4 and box_iou(cand, box) >= 0.55:
            return cand
    return tuple(float(v) for v in box)


def _background_box(rng: random.Random, width: int, height: int, objects) -> Optional[Tuple[float, ...]]:
    """A proposal on background or only partly on an object (IoU < 0.35 with every object)."""
    for _ in range(30):
        w = rng.uniform(0.15, 0.5) * width
        h = rng.uniform(0.15, 0.5) * height
        x1 = rng.uniform(0, width - w)
        y1 = rng.uniform(0, height - h)
        cand = (x1, y1, x1 + w, y1 + h)
        if max_iou(cand, objects) < 0.35:
            return cand
    return None


def _write_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    """An uncompressed npz like the VinVL dumps, with fixed zip timestamps (byte-reproducible;
    ``numpy.savez`` stamps the current time)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue())


def _voc_xml(tweet_id: str, width: int, height: int, objects: Sequence[Tuple[str, Tuple[int, ...]]]) -> str:
    lines = [
        "<annotation>",
        "\t<folder>images</folder>",
        f"\t<filename>{tweet_id}.jpg</filename>",
        f"\t<path>images/{tweet_id}.jpg</path>",
        "\t<source>",
        "\t\t<database>MQSPN demo (synthetic)</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for name, (x1, y1, x2, y2) in objects:
        lines += [
            "\t<object>",
            f"\t\t<name>{name}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            "\t\t<difficult>0</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{x1}</xmin>",
            f"\t\t\t<ymin>{y1}</ymin>",
            f"\t\t\t<xmax>{x2}</xmax>",
            f"\t\t\t<ymax>{y2}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def make_tweet(
    seed: int, split: str, index: int, catalogue: Sequence[CatalogueEntity], config: DemoDataConfig
) -> Dict:
    """One synthetic tweet with its image, gold boxes and proposals; a pure function of its
    arguments (its own random stream), so split sizes do not change other tweets."""
    rng = random.Random(f"mqspn-demo:{seed}:{split}:{index}")
    tweet_id = _tweet_id(split, index)
    tokens, tags, mentioned = _make_sentence(rng, catalogue)
    width = rng.randint(config.min_image_size, config.max_image_size)
    height = rng.randint(config.min_image_size, config.max_image_size)
    image = _background(np.random.default_rng(rng.getrandbits(64)), width, height)

    to_draw: List[CatalogueEntity] = [e for e in mentioned if rng.random() < config.groundable_rate]
    instances = list(to_draw) + [e for e in to_draw if rng.random() < config.second_instance_rate]
    others = [e for e in catalogue if e not in mentioned]
    distractors = rng.sample(others, rng.randint(0, min(config.max_distractors, len(others))))
    placed: List[Tuple[int, int, int, int]] = []
    drawn: List[Tuple[CatalogueEntity, Tuple[int, int, int, int]]] = []
    for entity in instances + distractors:
        box = _place(rng, width, height, placed)
        if box is None:  # no room left: the entity is not in the image (ungroundable) or absent
            continue
        placed.append(box)
        drawn.append((entity, box))
        _draw_entity(image, entity, box)

    gold = [(e.name, box) for e in mentioned for (d, box) in drawn if d == e]
    # One detection per drawn object, sometimes a second (detectors repeat themselves), then
    # background boxes, never more than max_proposals (validate() leaves room for every object).
    proposals: List[Tuple[float, ...]] = [_jitter(rng, box, width, height) for _, box in drawn]
    origins = list(range(len(drawn)))
    for index, (_, box) in enumerate(drawn):
        if rng.random() < 0.3 and len(proposals) < config.max_proposals:
            proposals.append(_jitter(rng, box, width, height))
            origins.append(index)
    if config.missed_detection_rate > 0:  # the detector misses an object: none of its proposals remain
        missed = {index for index in range(len(drawn)) if rng.random() < config.missed_detection_rate}
        proposals = [box for box, origin in zip(proposals, origins) if origin not in missed]
    room = config.max_proposals - len(proposals)
    wanted = min(rng.randint(config.min_background_proposals, config.max_background_proposals), room)
    for _ in range(wanted):
        box = _background_box(rng, width, height, placed)
        if box is not None:
            proposals.append(box)
    scores = [rng.uniform(0.2, 0.99) for _ in proposals]
    order = sorted(range(len(proposals)), key=lambda i: -scores[i])
    return {
        "id": tweet_id,
        "tokens": tokens,
        "tags": tags,
        "image": image,
        "width": width,
        "height": height,
        "gold": gold,  # [(name, (x1, y1, x2, y2) int)], in mention order
        "proposals": np.asarray([proposals[i] for i in order], dtype=np.float32).reshape(-1, 4),
        "scores": np.asarray([scores[i] for i in order], dtype=np.float32),
        "drawn": [(e.name, box) for e, box in drawn],
    }


def _write_tweet(out: Path, seed: int, split: str, index: int, catalogue, config: DemoDataConfig) -> Tuple[str, Dict]:
    """Write one tweet's image, proposals and xml into ``out`` → (its CoNLL block, its counts)."""
    tweet = make_tweet(seed, split, index, catalogue, config)
    tid = tweet["id"]
    conll = [f"IMGID:{tid}\n"]
    conll.extend(f"{tok}\t{tag}\n" for tok, tag in zip(tweet["tokens"], tweet["tags"]))
    conll.append("\n")
    tweet["image"].save(  # 4:4:4, so small objects keep their colours
        out / "images" / f"{tid}.jpg", format="JPEG", quality=config.jpeg_quality, subsampling=0
    )
    _write_npz(
        out / "vinvl" / f"{tid}.jpg.npz",
        {
            "num_boxes": np.int64(len(tweet["proposals"])),
            "bounding_boxes": tweet["proposals"],
            "scores": tweet["scores"],
            "image_h": np.int64(tweet["height"]),
            "image_w": np.int64(tweet["width"]),
        },
    )
    if tweet["gold"]:
        xml = _voc_xml(tid, tweet["width"], tweet["height"], tweet["gold"])
        (out / "xml" / f"{tid}.xml").write_text(xml, encoding="utf-8")
    counts = {
        "tweets": 1,
        "entities": sum(tag.startswith("B-") for tag in tweet["tags"]),
        "groundable_entities": len({name for name, _ in tweet["gold"]}),
        "boxes": len(tweet["gold"]),
        "xml_files": int(bool(tweet["gold"])),
    }
    return "".join(conll), counts


def generate_demo_release(
    output_dir: os.PathLike,
    seed: int = 0,
    config: Optional[DemoDataConfig] = None,
    overwrite: bool = False,
    workers: int = 1,
) -> Dict:
    """Write the demo release into ``output_dir`` and return a summary (counts per split).

    An existing release there is replaced only with ``overwrite=True``, and then only the entries
    this function writes (``RELEASE_ENTRIES``) are removed first, so no stale xml or image of a
    larger earlier run survives. ``workers`` > 1 draws the tweets in that many processes; every
    tweet has its own random stream, so the files are the same for any number of workers.
    """
    config = config or DemoDataConfig()
    config.validate()
    if workers < 1:
        raise ValueError(f"workers={workers}: give at least 1")
    out = Path(output_dir)
    existing = [name for name in RELEASE_ENTRIES if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a release ({', '.join(existing)}); pass overwrite=True "
            f"(--overwrite) to replace it or choose another folder"
        )
    for name in existing:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for sub in ("xml", "images", "vinvl"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    catalogue = make_catalogue(seed, config.entities_per_type)
    summary: Dict = {"seed": seed, "config": asdict(config), "splits": {}}
    tasks = [(split, index) for split in SPLITS for index in range(getattr(config, f"num_{split}"))]
    write = functools.partial(_write_tweet, out, seed, catalogue=catalogue, config=config)
    if workers == 1 or len(tasks) < 2 * workers:
        results = [write(split, index) for split, index in tasks]
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(write, *zip(*tasks), chunksize=max(1, len(tasks) // (8 * workers))))
    for split in SPLITS:
        stats = {"tweets": 0, "entities": 0, "groundable_entities": 0, "boxes": 0, "xml_files": 0}
        conll: List[str] = []
        for (task_split, _), (block, counts) in zip(tasks, results):
            if task_split == split:
                conll.append(block)
                for key, value in counts.items():
                    stats[key] += value
        (out / f"{split}.txt").write_text("".join(conll), encoding="utf-8", newline="\n")
        summary["splits"][split] = stats
    catalogue_json = {
        "seed": seed,
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "entities": [asdict(e) for e in catalogue],
    }
    (out / CATALOGUE_FILE).write_text(json.dumps(catalogue_json, indent=2) + "\n", encoding="utf-8")
    return summary
