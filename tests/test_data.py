"""Dataset readers (Twitter-GMNER, Twitter-FMNERG, JSONL) and the build_dataset CLI.

The real-data tests read ../shared/data and skip when it is absent; everything else runs on small
files the tests write.
"""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script
from modeling_mqspn.tools.data import (
    FMNERG_COARSE_TYPES,
    FMNERG_FINE_TYPES,
    FMNERG_TYPE_HIERARCHY,
    dataset_features,
    load_jsonl,
    load_twitter_fmnerg,
    load_twitter_gmner,
    write_references_jsonl,
)
from modeling_mqspn.tools.metrics import evaluate_grounded_ner, load_evaluation_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GMNER_DIR = SHARED / "twitter-gmner"
FMNERG_DIR = SHARED / "twitter-fmnerg"
needs_shared_data = pytest.mark.skipif(
    not (GMNER_DIR / "train.txt").exists() or not (FMNERG_DIR / "train.txt").exists(),
    reason=f"the real Twitter-GMNER / FMNERG annotations are not at {SHARED}",
)


# ---------------------------------------------------------------------------------------------
# Fixture writers


def write_conll(path, tweets):
    """tweets: [(id, [(token, tag, ...), ...])]."""
    lines = []
    for sample_id, tokens in tweets:
        lines.append(f"IMGID:{sample_id}")
        lines += ["\t".join(fields) for fields in tokens]
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_voc(folder, sample_id, objects, size=(640, 480)):
    folder.mkdir(exist_ok=True)
    parts = [f"<annotation><filename>{sample_id}.jpg</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2) in objects:
        parts.append(
            f"<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    (folder / f"{sample_id}.xml").write_text("".join(parts), encoding="utf-8")


TWEETS = [
    ("101", [("Clark", "B-PER"), ("Kent", "I-PER"), ("meets", "O"), ("Lois", "B-PER"), ("Lane", "I-PER"),
             ("in", "O"), ("Metropolis", "B-LOC")]),
    ("102", [("Dubai", "B-LOC"), ("World", "B-LOC"), ("Trade", "I-LOC"), ("Centre", "I-LOC")]),
    ("103", [("nothing", "O"), ("here", "O")]),
]


@pytest.fixture
def gmner_release(tmp_path):
    txt = write_conll(tmp_path / "dev.txt", TWEETS)
    xml = tmp_path / "xml"
    write_voc(xml, "101", [("Clark Kent", (40, 28, 296, 400)), ("Clark Kent", (300, 20, 500, 460)),
                           ("Metropolis", (0, 0, 640, 200))])
    return txt, str(xml)


def entity_tuples(row):
    return [(e["start"], e["end"], e["type"], [list(b) for b in e["boxes"]]) for e in row["entities"]]


# ---------------------------------------------------------------------------------------------
# Twitter-GMNER on small files


def test_gmner_reader_links_boxes_by_surface_string(gmner_release):
    txt, xml = gmner_release
    dataset, report = load_twitter_gmner(txt, xml)
    assert dataset.features == dataset_features()
    assert dataset["id"] == ["101", "102", "103"]
    first = dataset[0]
    assert first["words"] == ["Clark", "Kent", "meets", "Lois", "Lane", "in", "Metropolis"]
    assert entity_tuples(first) == [
        (0, 1, "PER", [[40, 28, 296, 400], [300, 20, 500, 460]]),  # two objects, one entity
        (3, 4, "PER", []),  # no object names it: not groundable
        (6, 6, "LOC", [[0, 0, 640, 200]]),
    ]
    assert first["image_size"] == [640, 480] and first["image"] is None and first["proposals"] == []
    # B- right after an entity starts a new one (the authors' reader loses "World Trade Centre").
    assert entity_tuples(dataset[1]) == [(0, 0, "LOC", []), (1, 3, "LOC", [])]
    assert dataset[1]["image_size"] is None  # no xml, no image
    assert dataset[2]["entities"] == []
    assert report.counts["entities"] == 5 and report.counts["groundable"] == 2 and report.counts["boxes"] == 3
    assert report.counts["adjacent_entities"] == 1
    assert report.warnings == {}


def test_malformed_conll_line_names_file_and_line(tmp_path):
    txt = write_conll(tmp_path / "bad.txt", [("1", [("a", "O"), ("b", "B-PER", "extra")])])
    with pytest.raises(ValueError, match=rf"{txt}:3: malformed line"):
        load_twitter_gmner(txt)
    (tmp_path / "outside.txt").write_text("token\tO\n")
    with pytest.raises(ValueError, match=rf"outside.txt:1: token line .* outside a tweet"):
        load_twitter_gmner(str(tmp_path / "outside.txt"))
    txt = write_conll(tmp_path / "tag.txt", [("1", [("a", "S-PER")])])
    with pytest.raises(ValueError, match=rf"{txt}:2: malformed tag 'S-PER'"):
        load_twitter_gmner(txt)
    txt = write_conll(tmp_path / "dup.txt", [("1", [("a", "O")]), ("1", [("b", "O")])])
    with pytest.raises(ValueError, match=rf"{txt}:4: id '1' already used at line 1"):
        load_twitter_gmner(txt)


def test_orphan_inside_tag_is_read_as_begin_with_a_counted_warning(tmp_path):
    txt = write_conll(
        tmp_path / "dev.txt",
        [("1", [("a", "I-PER"), ("b", "I-PER"), ("c", "O"), ("d", "B-ORG"), ("e", "I-LOC")])],
    )
    dataset, report = load_twitter_gmner(txt)
    assert entity_tuples(dataset[0]) == [(0, 1, "PER", []), (3, 3, "ORG", []), (4, 4, "LOC", [])]
    assert report.counts["orphan_inside_tags"] == 2
    assert report.examples["orphan_inside_tags"][0].startswith(f"{txt}:2:")
    assert "2 orphan inside tags" in report.summary()


def test_unknown_type_names_file_and_line(tmp_path):
    txt = write_conll(tmp_path / "dev.txt", [("1", [("a", "O"), ("b", "B-MISC")])])
    with pytest.raises(ValueError, match=rf"{txt}:3: unknown entity type 'MISC'"):
        load_twitter_gmner(txt)
    dataset, _ = load_twitter_gmner(txt, entity_types=["MISC"])
    assert dataset[0]["entities"][0]["type"] == "MISC"


def test_malformed_xml_is_an_error_naming_the_file(gmner_release, tmp_path):
    txt, xml = gmner_release
    (Path(xml) / "101.xml").write_text("<annotation><object><name>Clark Kent</name></annotation>")
    with pytest.raises(ValueError, match=r"101\.xml: not well-formed xml"):
        load_twitter_gmner(txt, xml)
    (Path(xml) / "101.xml").write_text("<annotation><object><name>Clark Kent</name></object></annotation>")
    with pytest.raises(ValueError, match=r"101\.xml: <object> #1 .*bndbox"):
        load_twitter_gmner(txt, xml)


@pytest.mark.parametrize(
    "document",
    [
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        "<annotation><object><name>&lol2;</name></object></annotation>",
        '<!DOCTYPE annotation SYSTEM "file:///etc/passwd"><annotation/>',
    ],
)
def test_xml_declaring_a_dtd_or_entities_is_refused(gmner_release, document):
    txt, xml = gmner_release
    (Path(xml) / "101.xml").write_text(document)
    with pytest.raises(ValueError, match=r"101\.xml: .*DTD or entities"):
        load_twitter_gmner(txt, xml)


def test_boxes_outside_the_image_are_clipped_and_counted(tmp_path):
    txt = write_conll(tmp_path / "dev.txt", [("1", [("Kent", "B-PER"), ("Smallville", "B-LOC")])])
    write_voc(tmp_path / "xml", "1", [("Kent", (-5, 10, 700, 300)), ("Smallville", (650, 490, 700, 500))])
    dataset, report = load_twitter_gmner(txt, str(tmp_path / "xml"))
    assert entity_tuples(dataset[0]) == [(0, 0, "PER", [[0, 10, 640, 300]]), (1, 1, "LOC", [])]
    assert report.counts["clipped_boxes"] == 2  # both clipped; the second is then empty
    assert report.counts["degenerate_boxes"] == 1
    assert report.counts["groundable"] == 1


def test_xml_object_naming_no_entity_is_counted(tmp_path):
    txt = write_conll(tmp_path / "dev.txt", [("1", [("Kent", "B-PER")])])
    write_voc(tmp_path / "xml", "1", [("Kent", (0, 0, 10, 10)), ("Lex", (5, 5, 20, 20))])
    _, report = load_twitter_gmner(txt, str(tmp_path / "xml"))
    assert report.counts["unmatched_xml_objects"] == 1 and "'Lex'" in report.examples["unmatched_xml_objects"][0]


def test_images_missing_images_are_counted_and_sizes_read(gmner_release, tmp_path):
    txt, xml = gmner_release
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (640, 480)).save(images / "101.jpg")
    Image.new("RGB", (32, 24)).save(images / "102.jpg")
    (images / "103.jpg").write_bytes(b"not a jpeg")
    dataset, report = load_twitter_gmner(txt, xml, images_dir=str(images))
    assert dataset["image"] == [str((images / "101.jpg").resolve()), str((images / "102.jpg").resolve()), None]
    assert dataset["image_size"] == [[640, 480], [32, 24], None]  # 102 has no xml: from the file
    assert report.counts["unreadable_images"] == 1
    (images / "103.jpg").unlink()
    dataset, report = load_twitter_gmner(txt, xml, images_dir=str(images))
    assert dataset["image"][2] is None
    assert report.warnings == {"missing_images": 1}
    assert "1 missing images, e.g. 103: image" in report.summary()
    with pytest.raises(FileNotFoundError, match="images folder"):
        load_twitter_gmner(txt, xml, images_dir=str(tmp_path / "absent"))


def test_vinvl_proposals_column(gmner_release, tmp_path):
    txt, xml = gmner_release
    vinvl = tmp_path / "vinvl"
    vinvl.mkdir()
    boxes = np.array([[0, 0, 700, 100], [10, 10, 50, 50], [10, 10, 50, 50]], np.float32)
    np.savez(vinvl / "101.jpg.npz", num_boxes=np.int64(3), bounding_boxes=boxes, scores=np.array([0.9, 0.8, 0.7]))
    np.savez(vinvl / "102.jpg.npz", num_boxes=np.int64(1), bounding_boxes=boxes[:1])
    dataset, report = load_twitter_gmner(txt, xml, vinvl_dir=str(vinvl), top_k=18)
    assert dataset["proposals"] == [[[0, 0, 640, 100], [10, 10, 50, 50]], [[0, 0, 700, 100]], []]
    assert report.counts["clipped_proposals"] == 1  # 101 has a 640 x 480 size from its xml
    assert report.counts["dropped_proposals"] == 1  # the duplicate
    assert report.counts["missing_proposal_files"] == 1  # 103


# ---------------------------------------------------------------------------------------------
# Twitter-FMNERG on small files


def test_fmnerg_label_spaces(tmp_path):
    tokens = [("Kent", "B-person", "B-journalist"), ("at", "O", "O"), ("Daily", "B-organization", "B-company"),
              ("Planet", "I-organization", "I-company"), ("Tower", "B-building", "B-building_other")]
    txt = write_conll(tmp_path / "dev.txt", [("1", tokens)])
    write_voc(tmp_path / "xml", "1", [("Kent", (0, 0, 10, 10))])
    expected = {
        "coarse": ["person", "organization", "building"],
        "fine": ["journalist", "company", "building_other"],
        "gmner": ["PER", "ORG", "LOC"],
    }
    for label_space, types in expected.items():
        dataset, _ = load_twitter_fmnerg(txt, str(tmp_path / "xml"), label_space)
        assert [e["type"] for e in dataset[0]["entities"]] == types
        assert [(e["start"], e["end"]) for e in dataset[0]["entities"]] == [(0, 0), (2, 3), (4, 4)]
        assert dataset[0]["entities"][0]["boxes"] == [[0, 0, 10, 10]]
    with pytest.raises(ValueError, match="label_space"):
        load_twitter_fmnerg(txt, label_space="both")


def test_fmnerg_fine_must_refine_coarse(tmp_path):
    txt = write_conll(tmp_path / "dev.txt", [("1", [("a", "O", "O"), ("Kent", "B-person", "B-company")])])
    with pytest.raises(ValueError, match=rf"{txt}:3: fine tag 'B-company' does not refine coarse tag 'B-person'"):
        load_twitter_fmnerg(txt)
    txt = write_conll(tmp_path / "dev2.txt", [("1", [("Kent", "B-person", "B-wizard")])])
    with pytest.raises(ValueError, match=rf"{txt}:2: unknown entity type 'wizard'"):
        load_twitter_fmnerg(txt)
    txt = write_conll(tmp_path / "dev3.txt", [("1", [("Kent", "B-person")])])
    with pytest.raises(ValueError, match=rf"{txt}:2: malformed line"):
        load_twitter_fmnerg(txt)


# ---------------------------------------------------------------------------------------------
# JSONL


def write_rows(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_jsonl_reader(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (100, 80)).save(tmp_path / "img" / "a.jpg")
    path = write_rows(tmp_path / "dev.jsonl", [
        {"id": "a", "words": ["Clark", "Kent", "flies"], "image": "img/a.jpg",
         "entities": [{"start": 0, "end": 1, "type": "PER", "text": "Clark Kent", "boxes": [[10, 10, 150, 50]]}],
         "proposals": [[0, 0, 20, 20], [0, 0, 20, 20], [5, 5, 5, 9]]},
        "",
        {"id": 7, "text": "Lois  Lane\tat home", "entities": [{"start": 0, "end": 1, "type": "PER"}],
         "image": "img/missing.jpg", "image_size": [50, 40]},
    ])
    dataset, report = load_jsonl(path, entity_types=["PER"])
    assert dataset.features == dataset_features()
    assert dataset[0]["image"] == str((tmp_path / "img" / "a.jpg").resolve())
    assert dataset[0]["image_size"] == [100, 80]
    assert entity_tuples(dataset[0]) == [(0, 1, "PER", [[10, 10, 100, 50]])]
    assert dataset[0]["proposals"] == [[0, 0, 20, 20]]
    assert dataset[1]["id"] == "7" and dataset[1]["words"] == ["Lois", "Lane", "at", "home"]
    assert dataset[1]["image"] is None and dataset[1]["image_size"] == [50, 40]
    assert report.warnings == {"clipped_boxes": 1, "missing_images": 1, "dropped_proposals": 2}


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"id": "a", "words": ["x"], "entities": [}', "not valid JSON"),
        ({"id": "a", "words": ["x"], "entities": [{"start": 0, "end": 0, "type": "MISC"}]}, "unknown entity type 'MISC'"),
        ({"id": "a", "words": ["x"], "entites": []}, r"unknown key\(s\) \['entites'\]"),
        ({"id": "a", "words": ["x"]}, "needs 'entities'"),
        ({"id": "a", "words": ["x"], "text": "x", "entities": []}, "exactly one of 'words'"),
        ({"id": "a", "words": ["x"], "entities": [{"start": 0, "end": 1, "type": "PER"}]}, "end < 1"),
        ({"id": "a", "words": ["x", "y"], "entities": [{"start": 0, "end": 0, "type": "PER", "text": "y"}]}, "'text' is 'y'"),
        ({"id": "a", "words": ["x"], "entities": [{"start": 0, "end": 0, "type": "PER", "boxes": [[0, 0, 1]]}]}, "4 finite numbers"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, row, message):
    path = write_rows(tmp_path / "dev.jsonl", [{"id": "ok", "words": ["fine"], "entities": []}, row])
    with pytest.raises(ValueError, match=rf"{path}:2: .*{message}"):
        load_jsonl(path, entity_types=["PER"])


def test_jsonl_duplicate_ids(tmp_path):
    row = {"id": "a", "words": ["x"], "entities": []}
    path = write_rows(tmp_path / "dev.jsonl", [row, row])
    with pytest.raises(ValueError, match=rf"{path}:2: id 'a' already used at line 1"):
        load_jsonl(path)


# ---------------------------------------------------------------------------------------------
# References and the CLI


def test_references_round_trip_scores_gold_perfectly(gmner_release, tmp_path):
    txt, xml = gmner_release
    dataset, _ = load_twitter_gmner(txt, xml)
    path = str(tmp_path / "refs.jsonl")
    assert write_references_jsonl(dataset, path) == 3
    references = load_evaluation_jsonl(path)
    assert references[0] == {"id": "101", "entities": [
        {"start": 0, "end": 1, "type": "PER", "boxes": [[40, 28, 296, 400], [300, 20, 500, 460]]},
        {"start": 3, "end": 4, "type": "PER", "boxes": []},
        {"start": 6, "end": 6, "type": "LOC", "boxes": [[0, 0, 640, 200]]},
    ]}
    predictions = [
        {"id": r["id"], "entities": [dict(start=e["start"], end=e["end"], type=e["type"], box=(e["boxes"] or [None])[-1])
                                     for e in r["entities"]]}
        for r in references
    ]
    assert evaluate_grounded_ner(predictions, references)["gmner"]["f1"] == 1.0


def test_build_dataset_cli_end_to_end(gmner_release, tmp_path, capsys):
    from datasets import load_from_disk

    txt, xml = gmner_release
    output, references = tmp_path / "built", tmp_path / "refs.jsonl"
    command = [sys.executable, str(ROOT / "processing" / "build_dataset.py"), "--format", "twitter-gmner",
               "--data_dir", str(Path(txt).parent), "--split", "dev", "--output", str(output),
               "--images", str(tmp_path), "--references_jsonl", str(references)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    assert "3 tweets, 5 entities (LOC 3, PER 2), 2 groundable" in completed.stdout
    assert "warning: 3 missing images" in completed.stdout
    dataset = load_from_disk(str(output))
    assert dataset.features == dataset_features() and dataset["id"] == ["101", "102", "103"]
    assert [row["id"] for row in load_evaluation_jsonl(str(references))] == ["101", "102", "103"]

    bad = write_conll(tmp_path / "test.txt", [("1", [("a", "B-XYZ")])])
    # The same script's main() in this process (a second interpreter would only load torch and datasets again).
    script = load_script("processing/build_dataset.py", "build_dataset_cli")
    capsys.readouterr()
    assert script.main(command[2:7] + ["test", "--output", str(tmp_path / "o2")]) == 2
    assert f"{bad}:2: unknown entity type 'XYZ'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real releases (../shared/data)


@pytest.fixture(scope="module")
def gmner_splits():
    return {
        split: load_twitter_gmner(str(GMNER_DIR / f"{split}.txt"), str(GMNER_DIR / "xml"))
        for split in ("train", "dev")
    }


def lost_by_skip_next_reader(rows):
    """Entities the authors' reader loses: it skips the token after each entity it reads (docs/DESIGN.md §10.5)."""
    lost = 0
    for row in rows:
        last_kept_end = None
        for entity in sorted(row["entities"], key=lambda e: e["start"]):
            if last_kept_end is not None and entity["start"] == last_kept_end + 1:
                lost += 1
            else:
                last_kept_end = entity["end"]
    return lost


@needs_shared_data
@pytest.mark.parametrize(
    "split, tweets, per_type, groundable, adjacent, lost",
    [
        ("train", 7000, {"PER": 5019, "LOC": 1918, "ORG": 3035, "OTHER": 1807}, 4733, 120, 119),
        ("dev", 1500, {"PER": 1072, "LOC": 407, "ORG": 595, "OTHER": 376}, 991, 28, 27),
    ],
)
def test_real_gmner_counts(gmner_splits, split, tweets, per_type, groundable, adjacent, lost):
    dataset, report = gmner_splits[split]
    rows = dataset.to_list()
    entities = [e for row in rows for e in row["entities"]]
    assert len(rows) == tweets
    assert len(entities) == sum(per_type.values()) == (11779 if split == "train" else 2450)
    assert Counter(e["type"] for e in entities) == per_type
    assert sum(bool(e["boxes"]) for e in entities) == groundable
    assert sum(not row["entities"] for row in rows) == (358 if split == "train" else 87)
    # Entities starting right after another are all kept, including those the authors' reader loses
    # (docs/DESIGN.md §10.5: 119 / 27; the one more here is a third entity in a row, "Ohio" in O_4454).
    ends = [{e["end"] for e in row["entities"]} for row in rows]
    assert sum(e["start"] - 1 in row_ends for row, row_ends in zip(rows, ends) for e in row["entities"]) == adjacent
    assert lost_by_skip_next_reader(rows) == lost
    assert report.counts["adjacent_entities"] == adjacent
    assert report.warnings == {}
    assert all(row["image_size"] is not None for row in rows if any(e["boxes"] for e in row["entities"]))


@needs_shared_data
def test_real_fmnerg_labels(gmner_splits):
    gmner_train, _ = gmner_splits["train"]
    coarse, _ = load_twitter_fmnerg(str(FMNERG_DIR / "train.txt"), str(GMNER_DIR / "xml"), "coarse")
    assert Counter(e["type"] for row in coarse.to_list() for e in row["entities"]) == {
        "person": 5019, "organization": 3035, "location": 1553, "event": 614, "art": 495,
        "building": 365, "product": 355, "other": 343,
    }
    fine, _ = load_twitter_fmnerg(str(FMNERG_DIR / "train.txt"), str(GMNER_DIR / "xml"), "fine")
    assert {e["type"] for row in fine.to_list() for e in row["entities"]} == set(FMNERG_FINE_TYPES)
    mapped, _ = load_twitter_fmnerg(str(FMNERG_DIR / "train.txt"), str(GMNER_DIR / "xml"), "gmner")
    assert mapped.to_list() == gmner_train.to_list()  # same tweets, spans, boxes; types mapped
    hierarchy = json.loads((FMNERG_DIR / "type_hierarchy.json").read_text())["coarse_to_fine"]
    assert {k: sorted(v) for k, v in hierarchy.items()} == {k: sorted(v) for k, v in FMNERG_TYPE_HIERARCHY.items()}
    assert len(FMNERG_COARSE_TYPES) == 8 and len(FMNERG_FINE_TYPES) == 51
