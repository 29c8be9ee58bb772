"""Malformed files and boxes (docs/robustness.md, "Files" and "Boxes"): CoNLL, Pascal VOC xml, VinVL npz and
JSONL readers name the file and line of what is wrong, refuse xml entities and pickles, and bad boxes are
clipped or dropped with a count, never silently and never with a crash."""

import json
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from modeling_mqspn.box_ops import box_iou, sanitize_boxes
from modeling_mqspn.tools.data import load_jsonl, load_twitter_gmner, read_voc_xml
from modeling_mqspn.tools.metrics import evaluate_grounded_ner, load_evaluation_jsonl
from modeling_mqspn.vinvl_mqspn import load_vinvl_proposals
from test_robustness_images import tiny_processor

# ------------------------------------------------------------------------------------------------
# CoNLL
# ------------------------------------------------------------------------------------------------

CONLL_CASES = {
    "missing tag": (b"IMGID:1\nMessi\n\n", r"train\.txt:2: malformed line 'Messi': expected 2"),
    "empty tag": (b"IMGID:1\nMessi\t\n\n", r"train\.txt:2: malformed line"),
    "token outside a tweet": (b"Messi\tB-PER\n", r"train\.txt:1: token line 'Messi\\tB-PER' outside a tweet"),
    "unknown type": (b"IMGID:1\nMessi\tB-XYZ\n", r"train\.txt:2: unknown entity type 'XYZ'"),
    "malformed tag": (b"IMGID:1\nMessi\tZ-PER\n", r"train\.txt:2: malformed tag 'Z-PER'"),
    "tweet without tokens": (b"IMGID:1\n\nIMGID:2\na\tO\n", r"train\.txt:1: tweet '1' has no token lines"),
    "duplicate id": (b"IMGID:1\na\tO\n\nIMGID:1\nb\tO\n", r"train\.txt:4: id '1' already used at line 1"),
    "empty id": (b"IMGID:  \na\tO\n", r"train\.txt:1: empty id"),
    "not UTF-8": (b"IMGID:1\nMess\xff\tB-PER\n", r"train\.txt:2: byte 0xff at column 5 is not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(CONLL_CASES))
def test_malformed_conll_is_an_error_naming_file_and_line(tmp_path, case):
    content, message = CONLL_CASES[case]
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_twitter_gmner(str(path))


def test_orphan_inside_tags_are_repaired_and_counted_not_dropped(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("IMGID:1\nMessi\tI-PER\nand\tO\nParis\tI-LOC\n", encoding="utf-8")
    dataset, report = load_twitter_gmner(str(path))
    assert [(e["start"], e["end"], e["type"]) for e in dataset[0]["entities"]] == [(0, 0, "PER"), (2, 2, "LOC")]
    assert report.warnings == {"orphan_inside_tags": 2}


# ------------------------------------------------------------------------------------------------
# Pascal VOC xml
# ------------------------------------------------------------------------------------------------

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">' for i in range(1, 10))
    + "]><annotation><object><name>&lol9;</name></object></annotation>"
)
EXTERNAL_ENTITY = (
    '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY secret SYSTEM "file:///etc/passwd">]>'
    "<annotation><object><name>&secret;</name></object></annotation>"
)


def voc(objects, size="<size><width>100</width><height>80</height></size>"):
    return f"<annotation>{size}{objects}</annotation>"


def box_xml(name, xmin, ymin, xmax, ymax):
    return (f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
            f"<ymax>{ymax}</ymax></bndbox></object>")


XML_CASES = {
    "entity expansion (billion laughs)": (BILLION_LAUGHS, "declares a DTD or entities"),
    "external entity": (EXTERNAL_ENTITY, "declares a DTD or entities"),
    "not well-formed": ("<annotation><object>", "not well-formed xml"),
    "object without name": (voc("<object><bndbox/></object>"), r"<object> #1 has no <name>"),
    "object without bndbox": (voc("<object><name>Messi</name></object>"), r"#1 \('Messi'\) needs a <bndbox>"),
    "non-numeric coordinate": (voc(box_xml("Messi", "left", 0, 5, 5)), "needs a <bndbox> with numeric"),
    "NaN coordinate": (voc(box_xml("Messi", "nan", 0, 5, 5)), "has a non-finite box"),
    "inf coordinate": (voc(box_xml("Messi", 0, 0, "inf", 5)), "has a non-finite box"),
    "not UTF-8": ("<annotation><object><name>\udcff</name></object></annotation>", "not well-formed xml"),
}


@pytest.mark.parametrize("case", sorted(XML_CASES))
def test_malformed_or_unsafe_xml_is_an_error_naming_the_file(tmp_path, case):
    content, message = XML_CASES[case]
    path = tmp_path / "1.xml"
    path.write_bytes(content.encode("utf-8", errors="surrogateescape"))
    with pytest.raises(ValueError, match=message) as error:
        read_voc_xml(str(path))
    assert str(path) in str(error.value)
    assert "root:" not in str(error.value)  # /etc/passwd was never read into the message


def test_xml_boxes_outside_the_image_or_inverted_are_clipped_or_removed_with_counts(tmp_path):
    (tmp_path / "xml").mkdir()
    (tmp_path / "train.txt").write_text("IMGID:1\nMessi\tB-PER\nParis\tB-LOC\n", encoding="utf-8")
    objects = box_xml("Messi", -20, -5, 50, 500) + box_xml("Paris", 60, 10, 40, 30) + box_xml("Paris", 10, 10, 10, 30)
    (tmp_path / "xml" / "1.xml").write_text(voc(objects), encoding="utf-8")
    dataset, report = load_twitter_gmner(str(tmp_path / "train.txt"), xml_dir=str(tmp_path / "xml"))
    messi, paris = dataset[0]["entities"]
    assert messi["boxes"] == [[0.0, 0.0, 50.0, 80.0]]
    assert paris["boxes"] == []  # x2 < x1 and zero width: both removed, the entity is not groundable
    assert report.warnings == {"clipped_boxes": 1, "degenerate_boxes": 2}


# ------------------------------------------------------------------------------------------------
# VinVL npz
# ------------------------------------------------------------------------------------------------


class CreatesAFileWhenUnpickled:
    """Unpickling calls open(path, "w"): proof that a reader unpickled the payload."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_inside_an_npz_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = CreatesAFileWhenUnpickled(str(marker))
    path = tmp_path / "1.jpg.npz"
    np.savez(path, num_boxes=np.array(1), bounding_boxes=np.zeros((1, 4)), objects=payload)
    with open(tmp_path / "probe.pkl", "wb") as handle:  # the payload really does act when unpickled
        pickle.dump(payload[0], handle)
    with open(tmp_path / "probe.pkl", "rb") as handle:
        pickle.load(handle).close()
    assert marker.exists()
    marker.unlink()
    load_vinvl_proposals(str(path))  # an unused object array is not read at all
    np.savez(path, num_boxes=np.array(1), bounding_boxes=payload)
    with pytest.raises(ValueError, match=r"1\.jpg\.npz: key 'bounding_boxes' is not a numeric array .*allow_pickle"):
        load_vinvl_proposals(str(path))
    assert not marker.exists()


def write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return str(path)


NPZ_CASES = {
    "not a zip": (lambda p: p.write_bytes(b"PK\x03\x04 broken"), "not a readable numpy .npz archive"),
    "empty file": (lambda p: p.write_bytes(b""), "not a readable numpy .npz archive"),
    "single array": (lambda p: p.write_bytes(open(write_npy(p), "rb").read()), "found a single array"),
    "missing key": (lambda p: write_npz(p, bounding_boxes=np.zeros((1, 4))), "missing key 'num_boxes'"),
    "wrong shape": (lambda p: write_npz(p, num_boxes=np.array(2), bounding_boxes=np.zeros((2, 3))), r"shape \(N, 4\)"),
    "fractional count": (lambda p: write_npz(p, num_boxes=np.array(1.5), bounding_boxes=np.zeros((2, 4))), "integer scalar"),
    "count beyond rows": (lambda p: write_npz(p, num_boxes=np.array(9), bounding_boxes=np.zeros((2, 4))), "is 9 but"),
    "negative count": (lambda p: write_npz(p, num_boxes=np.array(-1), bounding_boxes=np.zeros((2, 4))), "is -1 but"),
    "string boxes": (lambda p: write_npz(p, num_boxes=np.array(1), bounding_boxes=np.array([["a"] * 4])), "not a numeric array"),
    "short scores": (lambda p: write_npz(p, num_boxes=np.array(2), bounding_boxes=np.zeros((2, 4)), scores=np.zeros(1)), "1 values for 2 boxes"),
}


def write_npy(path):
    npy = str(path) + ".npy"
    np.save(npy, np.zeros(3))
    return npy


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_malformed_npz_is_an_error_naming_the_file(tmp_path, case):
    write, message = NPZ_CASES[case]
    path = tmp_path / "1.jpg.npz"
    write(path)
    with pytest.raises(ValueError, match=message) as error:
        load_vinvl_proposals(str(path))
    assert str(path) in str(error.value)


def test_npz_non_finite_inverted_and_outside_boxes_are_dropped_or_clipped_and_counted(tmp_path):
    boxes = np.array([[0, 0, np.nan, 5], [0, 0, np.inf, 5], [30, 5, 10, 20], [5, 5, 5, 20], [-10, -10, 200, 50],
                      [2, 2, 8, 8], [2, 2, 8, 8]], dtype=np.float64)
    path = write_npz(tmp_path / "1.jpg.npz", num_boxes=np.array(7), bounding_boxes=boxes,
                     scores=np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, np.nan]))
    found = load_vinvl_proposals(path, image_size=(100, 40))
    assert found.boxes.tolist() == [[0.0, 0.0, 100.0, 40.0], [2.0, 2.0, 8.0, 8.0]]
    assert found.dropped == {"non_finite": 3, "degenerate": 2, "duplicate": 0} and found.num_clipped == 1


def test_thousands_of_npz_boxes_keep_the_top_k_by_score(tmp_path):
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 500, (10000, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(2, 100, (10000, 2))], axis=1)
    scores = rng.uniform(0, 1, 10000)
    path = write_npz(tmp_path / "1.jpg.npz", num_boxes=np.array(10000), bounding_boxes=boxes, scores=scores)
    found = load_vinvl_proposals(path, top_k=18)
    best = np.argsort(-scores, kind="stable")[:18]
    assert np.allclose(found.boxes, boxes[best].astype(np.float32)) and found.num_read == 10000


# ------------------------------------------------------------------------------------------------
# JSONL (dataset and evaluation)
# ------------------------------------------------------------------------------------------------

ROW = {"id": "t1", "words": ["Messi", "in", "Paris"], "entities": [{"start": 0, "end": 0, "type": "PER"}]}

JSONL_CASES = {
    "not JSON": (b'{"id": "t1", words}\n', r":1: not valid JSON"),
    "not an object": (b"[1, 2]\n", r":1: expected a JSON object"),
    "unknown key": (json.dumps({**ROW, "caption": "x"}).encode() + b"\n", r":1: unknown key\(s\) \['caption'\]"),
    "bool index": (json.dumps({**ROW, "entities": [{"start": True, "end": 0, "type": "PER"}]}).encode(), r"got True, 0"),
    "NaN box": (json.dumps({**ROW, "entities": [{"start": 0, "end": 0, "type": "PER", "boxes": [[float("nan"), 0, 1, 1]]}]}).encode(),
                "4 finite numbers"),
    "span beyond words": (json.dumps({**ROW, "entities": [{"start": 2, "end": 5, "type": "PER"}]}).encode(), "end < 3"),
    "nested too deeply": (b'{"id": "t1", "words": ["a"], "entities": [], "proposals": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                          r":1: JSON nested too deeply"),
    "not UTF-8": (b'{"id": "t\xff1", "words": ["a"], "entities": []}\n', r":1: byte 0xff at column 10 is not UTF-8"),
    "duplicate id": (json.dumps(ROW).encode() + b"\n\n" + json.dumps(ROW).encode(), r":3: id 't1' already used at line 1"),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_malformed_dataset_jsonl_is_an_error_naming_file_and_line(tmp_path, case):
    content, message = JSONL_CASES[case]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        load_jsonl(str(path), entity_types=["PER", "LOC"])
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content,message", [
    (b'{"id": 1, "entities": []}\n{"id": \n', r"preds\.jsonl:2: not valid JSON"),
    (b'"just a string"\n', r"preds\.jsonl:1: expected a JSON object"),
    (b"\xef\xbb\xbf" + b'{"id": 1, "entities": []}\n\xc3\x28\n', r"preds\.jsonl:2: byte 0xc3 at column 1 is not UTF-8"),
    (b"[" * 100000 + b"]" * 100000 + b"\n", r"preds\.jsonl:1: JSON nested too deeply"),
])
def test_malformed_evaluation_jsonl_is_an_error_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_evaluation_jsonl(str(path))


def test_evaluation_refuses_bool_indices_and_non_finite_boxes():
    references = [{"id": "1", "entities": [{"start": 1, "end": 1, "type": "PER", "boxes": []}]}]
    with pytest.raises(ValueError, match="got True, True"):
        evaluate_grounded_ner([{"id": "1", "entities": [{"start": True, "end": True, "type": "PER", "box": None}]}],
                              references)
    for box in ([0, 0, float("nan"), 1], [0, 0, float("inf"), 1], [0, 0, 1]):
        with pytest.raises(ValueError, match="4 finite numbers"):
            evaluate_grounded_ner([{"id": "1", "entities": [{"start": 1, "end": 1, "type": "PER", "box": box}]}],
                                  references)


# ------------------------------------------------------------------------------------------------
# Missing files
# ------------------------------------------------------------------------------------------------


def test_missing_files_are_named_or_counted(tmp_path):
    gone = tmp_path / "gone"
    for call in (lambda: load_twitter_gmner(str(gone / "train.txt")), lambda: load_jsonl(str(gone / "rows.jsonl")),
                 lambda: load_evaluation_jsonl(str(gone / "preds.jsonl")), lambda: read_voc_xml(str(gone / "1.xml")),
                 lambda: load_vinvl_proposals(str(gone / "1.jpg.npz"))):
        with pytest.raises(FileNotFoundError, match="gone"):
            call()
    (tmp_path / "train.txt").write_text("IMGID:1\nMessi\tB-PER\n", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="the xml folder .*gone does not exist"):
        load_twitter_gmner(str(tmp_path / "train.txt"), xml_dir=str(gone))
    (tmp_path / "images").mkdir()
    (tmp_path / "vinvl").mkdir()
    dataset, report = load_twitter_gmner(str(tmp_path / "train.txt"), images_dir=str(tmp_path / "images"),
                                         vinvl_dir=str(tmp_path / "vinvl"))
    assert dataset[0]["image"] is None and dataset[0]["proposals"] == []
    assert report.warnings == {"missing_images": 1, "missing_proposal_files": 1}


# ------------------------------------------------------------------------------------------------
# Boxes
# ------------------------------------------------------------------------------------------------

BAD_BOXES = {
    "negative": ([-30, -10, 20, 20], [0.0, 0.0, 20.0, 20.0]),
    "beyond the image": ([50, 30, 400, 300], [50.0, 30.0, 100.0, 80.0]),
    "NaN": ([float("nan"), 0, 10, 10], None),
    "inf": ([0, 0, float("inf"), 10], None),
    "x2 < x1": ([40, 10, 20, 30], None),
    "zero area": ([10, 10, 10, 30], None),
    "entirely outside": ([200, 200, 300, 300], None),
}


@pytest.mark.parametrize("case", sorted(BAD_BOXES))
def test_bad_proposal_boxes_are_clipped_or_dropped_with_a_count(case):
    box, expected = BAD_BOXES[case]
    processor = tiny_processor()
    image = Image.new("RGB", (100, 80), (20, 120, 60))
    good = [1, 1, 9, 9]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = processor(words=["a"], images=image, boxes=[box, good])
    kept = out["region_boxes"][0].tolist()
    if expected is None:
        assert kept == [[1.0, 1.0, 9.0, 9.0]]
        assert any("dropped 1 non-finite, degenerate or duplicate proposal box(es) in 1 tweet(s): #0 (1)"
                   in str(item.message) for item in record)
    else:
        assert kept == [expected, [1.0, 1.0, 9.0, 9.0]] and not record
    assert sanitize_boxes([box, good], 100, 80)[0][-1] == (1.0, 1.0, 9.0, 9.0)


def test_bad_gold_boxes_are_refused_or_never_correct():
    processor = tiny_processor()
    for box in ([float("nan"), 0, 1, 1], [0, 0, float("inf"), 5]):
        with pytest.raises(ValueError, match=r"sample #0, entity 0: a box must be \[x1, y1, x2, y2\] of 4 finite numbers, got \["):
            processor(words=["a"], entities=[{"start": 0, "end": 0, "type": "PER", "boxes": [box]}])
    # An inverted or zero-area box overlaps nothing: IoU 0, so it never makes a prediction correct.
    assert box_iou([40, 10, 20, 30], [20, 10, 40, 30]) == 0.0 and box_iou([10, 10, 10, 30], [10, 10, 10, 30]) == 0.0
    references = [{"id": "1", "entities": [{"start": 0, "end": 0, "type": "PER", "boxes": [[40, 10, 20, 30]]}]}]
    predictions = [{"id": "1", "entities": [{"start": 0, "end": 0, "type": "PER", "box": [40, 10, 20, 30]}]}]
    result = evaluate_grounded_ner(predictions, references)
    assert result["gmner"]["counts"]["tp"] == 0 and result["mner"]["counts"]["tp"] == 1


def test_max_regions_zero_keeps_no_proposal():
    processor = tiny_processor(max_regions=0)
    out = processor(words=["a"], images=Image.new("RGB", (20, 20)), boxes=[[0, 0, 10, 10]])
    assert out["region_mask"].shape == (1, 0) and sanitize_boxes([[0, 0, 10, 10]], top_k=0) == ([], 0)


def test_thousands_of_boxes_keep_the_first_k_valid_ones():
    rng = np.random.default_rng(0)
    corners = rng.uniform(-50, 150, (5000, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(-5, 60, (5000, 2))], axis=1)
    boxes[::7] = np.nan
    processor = tiny_processor(max_regions=18)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = processor(words=["a"], images=Image.new("RGB", (100, 80)), boxes=boxes.tolist())
    expected, _ = sanitize_boxes(boxes.tolist(), 100, 80, top_k=18)
    assert len(expected) == 18 and np.allclose(out["region_boxes"][0].numpy(), np.array(expected, dtype=np.float32))
    # The metric copes with thousands of gold boxes per entity.
    references = [{"id": "1", "entities": [{"start": 0, "end": 0, "type": "PER",
                                            "boxes": np.nan_to_num(boxes).tolist()[:3000] + [[0, 0, 10, 10]]}]}]
    predictions = [{"id": "1", "entities": [{"start": 0, "end": 0, "type": "PER", "box": [0, 0, 10, 10]}]}]
    assert evaluate_grounded_ner(predictions, references)["gmner"]["counts"]["tp"] == 1
