"""The demo release: real Twitter-GMNER layout, reproducible, and grounding that needs the pixels."""

import hashlib
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modeling_mqspn.box_ops import box_iou  # noqa: E402
from modeling_mqspn.tools.demo_data import (  # noqa: E402
    ENTITY_TYPES,
    PALETTE,
    DemoDataConfig,
    generate_demo_release,
    make_catalogue,
    make_tweet,
)
from processing import make_demo_data  # noqa: E402

SMALL = DemoDataConfig(num_train=40, num_dev=12, num_test=12)


def read_conll(path):
    """Tweets as (id, tokens, entities=[(start, end, type)]) with a strict reader of §1.1."""
    text = path.read_text(encoding="utf-8")
    assert "\r" not in text and text.endswith("\n\n")
    tweets = []
    for block in text.strip("\n").split("\n\n"):
        lines = block.split("\n")
        assert lines[0].startswith("IMGID:"), lines[0]
        tokens, tags = zip(*(line.split("\t") for line in lines[1:]))
        entities, start = [], None
        for i, tag in enumerate(list(tags) + ["O"]):
            if start is not None and not tag.startswith("I-"):
                entities.append((start, i - 1, tags[start][2:]))
                start = None
            if tag.startswith("B-"):
                start = i
            elif tag.startswith("I-"):
                assert start is not None and tags[start][2:] == tag[2:], (lines[0], i)
            else:
                assert tag == "O", tag
        tweets.append((lines[0][6:], list(tokens), entities))
    return tweets


def tree_digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo_release(out, seed=0, config=SMALL)
    return out, summary


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path, release):
    out, _ = release
    again = tmp_path / "again"
    summary = generate_demo_release(again, seed=0, config=SMALL, workers=2)  # drawn in two processes
    assert tree_digest(out) == tree_digest(again)
    assert summary == release[1]
    other = tmp_path / "other"
    generate_demo_release(other, seed=1, config=SMALL)
    first, second = tree_digest(out), tree_digest(other)
    images = [k for k in first if k.startswith("images/")]
    assert images == [k for k in second if k.startswith("images/")]  # ids: split and index only
    assert sum(first[k] != second[k] for k in images) == len(images)


def test_split_sizes_do_not_change_the_other_splits(tmp_path, release):
    out, _ = release
    bigger = tmp_path / "bigger"
    generate_demo_release(bigger, seed=0, config=DemoDataConfig(num_train=50, num_dev=12, num_test=12))
    assert (bigger / "dev.txt").read_bytes() == (out / "dev.txt").read_bytes()
    assert (bigger / "train.txt").read_text().startswith((out / "train.txt").read_text())


def test_layout_and_counts_follow_the_release_format(release):
    out, summary = release
    all_ids = []
    for split in ("train", "dev", "test"):
        tweets = read_conll(out / f"{split}.txt")
        assert len(tweets) == getattr(SMALL, f"num_{split}") == summary["splits"][split]["tweets"]
        assert sum(len(e) for _, _, e in tweets) == summary["splits"][split]["entities"]
        all_ids += [tid for tid, _, _ in tweets]
        for tid, tokens, entities in tweets:
            assert all(tok and "\t" not in tok and " " not in tok for tok in tokens)
            assert {t for _, _, t in entities} <= set(ENTITY_TYPES)
    assert len(set(all_ids)) == len(all_ids)
    assert {i.split("_")[0] for i in all_ids if "_" in i} == {"16", "O"}  # the release's id styles
    assert {p.name for p in (out / "images").iterdir()} == {f"{i}.jpg" for i in all_ids}
    assert {p.name for p in (out / "vinvl").iterdir()} == {f"{i}.jpg.npz" for i in all_ids}
    assert {p.stem for p in (out / "xml").iterdir()} <= set(all_ids)


def test_xml_boxes_link_to_entities_and_are_covered_by_proposals(release):
    out, _ = release
    groundable = ungroundable = 0
    for split in ("train", "dev", "test"):
        for tid, tokens, entities in read_conll(out / f"{split}.txt"):
            image = Image.open(out / "images" / f"{tid}.jpg")
            assert image.format == "JPEG" and image.mode == "RGB"
            with np.load(out / "vinvl" / f"{tid}.jpg.npz", allow_pickle=False) as npz:
                assert npz["num_boxes"].dtype == np.int64 and npz["num_boxes"].shape == ()
                boxes, scores = npz["bounding_boxes"], npz["scores"]
                assert boxes.dtype == np.float32 and boxes.shape == (int(npz["num_boxes"]), 4)
                assert (int(npz["image_w"]), int(npz["image_h"])) == image.size
            assert scores.dtype == np.float32 and np.all(np.diff(scores) <= 0)
            assert 0 < len(boxes) <= SMALL.max_proposals
            assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
            assert np.all(boxes >= 0) and np.all(boxes[:, [0, 2]] <= image.size[0])
            assert np.all(boxes[:, [1, 3]] <= image.size[1])
            surfaces = [" ".join(tokens[s : e + 1]) for s, e, _ in entities]
            xml_path = out / "xml" / f"{tid}.xml"
            if not xml_path.exists():
                ungroundable += len(entities)
                continue
            root = ET.parse(xml_path).getroot()
            size = root.find("size")
            assert (int(size.find("width").text), int(size.find("height").text)) == image.size
            objects = root.findall("object")
            assert objects, f"{xml_path} has no <object>"
            names = set()
            for obj in objects:
                name = obj.find("name").text
                assert name in surfaces, (tid, name)  # no orphan boxes
                names.add(name)
                gold = [int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
                assert 0 <= gold[0] < gold[2] <= image.size[0] and 0 <= gold[1] < gold[3] <= image.size[1]
                assert max(box_iou(gold, b) for b in boxes.tolist()) >= 0.5, (tid, name)
            groundable += len(names)
            ungroundable += len(surfaces) - len(names)
    assert groundable > 0 and ungroundable > 0
    assert 0.45 < groundable / (groundable + ungroundable) < 0.85


def _share_of_colour(crop, rgb, tolerance=60.0):
    pixels = np.asarray(crop, dtype=np.float32).reshape(-1, 3)
    return float((np.linalg.norm(pixels - np.asarray(rgb, dtype=np.float32), axis=1) < tolerance).mean())


def test_each_gold_box_shows_its_entitys_two_colours(release):
    out, _ = release
    catalogue = {e["name"]: e for e in json.loads((out / "demo_catalogue.json").read_text())["entities"]}
    assert len({e["primary"] for e in catalogue.values()}) == len(catalogue)  # the primary identifies it
    checked = 0
    for xml_path in sorted((out / "xml").iterdir()):
        image = Image.open(out / "images" / f"{xml_path.stem}.jpg").convert("RGB")
        for obj in ET.parse(xml_path).getroot().findall("object"):
            entity = catalogue[obj.find("name").text]
            box = [int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")]
            # The middle of the box is inside every shape and shows only the entity's two colours.
            w, h = box[2] - box[0], box[3] - box[1]
            crop = image.crop((box[0] + 0.35 * w, box[1] + 0.35 * h, box[2] - 0.35 * w, box[3] - 0.35 * h))
            colours = _share_of_colour(crop, PALETTE[entity["primary"]]) + _share_of_colour(
                crop, PALETTE[entity["secondary"]]
            )
            assert colours > 0.8, (xml_path.stem, entity["name"], colours)
            checked += 1
    assert checked > 20


def test_images_hold_distractors_and_mentioned_entities_can_be_absent():
    catalogue = make_catalogue(0, SMALL.entities_per_type)
    with_distractor = absent = 0
    for index in range(30):
        tweet = make_tweet(0, "dev", index, catalogue, SMALL)
        surfaces = {" ".join(tweet["tokens"][i:j]) for i in range(len(tweet["tokens"])) for j in range(i + 1, len(tweet["tokens"]) + 1)}
        drawn_names = {name for name, _ in tweet["drawn"]}
        gold_names = {name for name, _ in tweet["gold"]}
        with_distractor += bool(drawn_names - gold_names)
        assert not (drawn_names - gold_names) & surfaces  # distractors are never mentioned
        mentioned = sum(tag.startswith("B-") for tag in tweet["tags"])
        absent += mentioned - len(gold_names)
        # every drawn object (gold or distractor) has a proposal, plus background ones
        for _, box in tweet["drawn"]:
            assert max(box_iou(box, b) for b in tweet["proposals"].tolist()) >= 0.5
        assert len(tweet["proposals"]) > len(tweet["drawn"])
    assert with_distractor >= 10 and absent >= 5


def test_catalogue_names_are_unique_and_never_nested():
    catalogue = make_catalogue(3, 6)
    names = [e.name for e in catalogue]
    assert len(set(names)) == len(names) == 6 * len(ENTITY_TYPES)
    assert len({e.primary for e in catalogue}) == len(catalogue)
    assert all(e.secondary != e.primary for e in catalogue)
    fixed = {"Lake", "Port", "City", "Valley", "Mount", "United", "Labs", "FC", "Records", "News",
             "Airlines", "Cup", "Phone", "Fest", "Operation", "Awards"}
    owner = {}
    for entity in catalogue:
        for word in set(entity.tokens) - fixed:
            assert owner.setdefault(word, entity.name) == entity.name


def test_existing_release_needs_overwrite_and_overwrite_removes_stale_files(tmp_path):
    generate_demo_release(tmp_path, seed=0, config=DemoDataConfig(num_train=20, num_dev=3, num_test=3))
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_demo_release(tmp_path, seed=0, config=DemoDataConfig(num_train=5, num_dev=3, num_test=3))
    (tmp_path / "notes.txt").write_text("mine")
    make_demo_data.main(
        ["--output", str(tmp_path), "--overwrite", "--num_train", "5", "--num_dev", "3", "--num_test", "3"]
    )
    assert len(list((tmp_path / "images").iterdir())) == 11
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(entities_per_type=2), "entities_per_type"),
        (dict(entities_per_type=7), "primary colours"),
        (dict(min_image_size=100, max_image_size=80), "min_image_size"),
        (dict(groundable_rate=1.5), "groundable_rate"),
        (dict(max_proposals=5), "max_proposals"),
    ],
)
def test_bad_config_is_refused_with_the_field_name(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        generate_demo_release(tmp_path, config=DemoDataConfig(**bad))
