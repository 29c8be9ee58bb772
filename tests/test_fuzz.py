"""Property-based fuzzing (hypothesis) of the readers, the processor, the box maths and the metrics
(docs/robustness.md, "Fuzzing"). Every property either holds or the input is refused with a `ValueError`
(never another exception type); each test has a fixed example budget so the file runs in well under a minute."""

import io
import json
import math
import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_mqspn.box_ops import box_iou, sanitize_boxes
from modeling_mqspn.tools.data import load_jsonl, load_twitter_gmner, read_voc_xml
from modeling_mqspn.image_utils import load_rgb_image
from modeling_mqspn.tools.metrics import evaluate_grounded_ner, load_evaluation_jsonl
from modeling_mqspn.processing_mqspn import split_words
from modeling_mqspn.vinvl_mqspn import load_vinvl_proposals
from test_robustness_images import tiny_processor

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

coordinates = st.one_of(
    st.floats(-50, 250, allow_nan=False), st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 100.0])
)
boxes = st.lists(coordinates, min_size=4, max_size=4)


def scratch_file(data: bytes, suffix: str) -> str:
    handle, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    return path


def refused_or_returns(call, *, allowed=(ValueError,)):
    """Run `call`; a refusal must be one of `allowed` with a non-empty message."""
    try:
        result = call()
    except allowed as error:
        assert str(error)
        event(f"refused: {type(error).__name__}")
        return None
    event("accepted")
    return result


# ------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 6) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
entity_like = st.fixed_dictionaries(
    {"start": st.integers(-1, 4) | st.booleans(), "end": st.integers(-1, 4), "type": st.sampled_from(["PER", "LOC", "", 3])},
    optional={"boxes": st.lists(st.lists(coordinates | st.text(max_size=2), max_size=5), max_size=3),
              "text": st.text(max_size=6)},
)
row_like = st.fixed_dictionaries(
    {"id": st.text(max_size=4) | st.integers(0, 3)},
    optional={
        "words": st.lists(st.text(max_size=5), max_size=5), "text": st.text(max_size=20) | st.integers(),
        "entities": st.lists(entity_like, max_size=3) | json_values, "image_size": json_values,
        "proposals": st.lists(boxes, max_size=4) | json_values, "extra": json_values,
    },
)


valid_row = st.builds(
    lambda i, words, spans, boxes_: {
        "id": f"t{i}", "words": words,
        "entities": [{"start": min(s, len(words) - 1), "end": min(s + d, len(words) - 1), "type": t, "boxes": boxes_}
                     for s, d, t in spans],
    },
    st.integers(0, 3), st.lists(st.text("abé\u0301 ", min_size=1, max_size=4).filter(str.strip), min_size=1, max_size=5),
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2), st.sampled_from(["PER", "LOC"])), max_size=3),
    st.lists(st.tuples(st.integers(-5, 50), st.integers(-5, 50), st.integers(-5, 90), st.integers(-5, 90)).map(list), max_size=2),
)


@FUZZ
@given(rows=st.one_of(st.lists(valid_row, min_size=1, max_size=3),
                      st.lists(st.one_of(valid_row, row_like, json_values), min_size=1, max_size=3)))
def test_fuzz_jsonl_reader_returns_valid_rows_or_a_value_error(rows):
    path = scratch_file("\n".join(json.dumps(row) for row in rows).encode(), ".jsonl")
    try:
        result = refused_or_returns(lambda: load_jsonl(path, entity_types=["PER", "LOC"]))
    finally:
        os.unlink(path)
    if result is not None:
        dataset, report = result
        for row in dataset:
            assert row["words"] and all(isinstance(word, str) for word in row["words"])
            for entity in row["entities"]:
                assert 0 <= entity["start"] <= entity["end"] < len(row["words"])
                assert entity["type"] in ("PER", "LOC")
                assert all(math.isfinite(v) for box in entity["boxes"] for v in box)
        assert report.counts["tweets"] == len(dataset)


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzz_readers_refuse_arbitrary_bytes_with_a_value_error(data):
    for suffix, reader in ((".jsonl", load_jsonl), (".jsonl", load_evaluation_jsonl), (".txt", load_twitter_gmner),
                           (".xml", read_voc_xml), (".npz", load_vinvl_proposals)):
        path = scratch_file(data, suffix)
        try:
            refused_or_returns(lambda: reader(path))
        finally:
            os.unlink(path)


token_line = st.builds(lambda token, tag: f"{token}\t{tag}", st.text("ab#", min_size=1, max_size=3),
                       st.sampled_from(["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]))
tweet_lines = st.builds(lambda i, lines: [f"IMGID:{i}"] + lines + [""], st.integers(0, 1000),
                        st.lists(token_line, min_size=1, max_size=6))
garbage_line = st.sampled_from(["", "IMGID:", "a", "a\tB-XX", "a\tI-", "a\tX-PER", "a\tB-PER\tO", "\tO", "IMGID:7"])
conll_lines = st.lists(st.one_of(tweet_lines, tweet_lines, tweet_lines, st.lists(garbage_line, max_size=2)),
                       max_size=5).map(lambda blocks: [line for block in blocks for line in block])


@FUZZ
@given(lines=conll_lines)
def test_fuzz_conll_reader_spans_are_valid_or_a_value_error(lines):
    path = scratch_file("\n".join(lines).encode(), ".txt")
    try:
        result = refused_or_returns(lambda: load_twitter_gmner(path))
    finally:
        os.unlink(path)
    if result is not None:
        dataset, _ = result
        for row in dataset:
            previous_end = -1
            for entity in row["entities"]:
                assert previous_end < entity["start"] <= entity["end"] < len(row["words"])
                previous_end = entity["end"]


@FUZZ
@given(
    rows=st.integers(0, 6), declared=st.integers(-2, 8),
    values=st.lists(coordinates, min_size=32, max_size=32), scores=st.lists(coordinates, min_size=8, max_size=8),
    with_scores=st.booleans(), top_k=st.integers(0, 5),
)
def test_fuzz_vinvl_reader_keeps_at_most_k_finite_inside_boxes(rows, declared, values, scores, with_scores, top_k):
    arrays = {"num_boxes": np.array(declared), "bounding_boxes": np.array(values[: rows * 4]).reshape(rows, 4)}
    if with_scores:
        arrays["scores"] = np.array(scores[:rows])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = scratch_file(buffer.getvalue(), ".npz")
    try:
        found = refused_or_returns(lambda: load_vinvl_proposals(path, top_k=top_k, image_size=(120, 90)))
    finally:
        os.unlink(path)
    if found is not None:
        assert 0 <= declared <= rows and len(found.boxes) <= top_k
        for x1, y1, x2, y2 in found.boxes.tolist():
            assert 0 <= x1 < x2 <= 120 and 0 <= y1 < y2 <= 90
        assert len(found.boxes) + sum(found.dropped.values()) <= declared


# ------------------------------------------------------------------------------------------------
# Box maths and the processor
# ------------------------------------------------------------------------------------------------


@FUZZ
@given(a=boxes, b=boxes, candidates=st.lists(boxes, max_size=30), top_k=st.integers(0, 20))
def test_fuzz_iou_and_sanitize_boxes(a, b, candidates, top_k):
    if all(map(math.isfinite, a + b)):
        iou = box_iou(a, b)
        assert 0.0 <= iou <= 1.0 + 1e-9 and iou == pytest.approx(box_iou(b, a))
    kept, dropped = sanitize_boxes(candidates, 100, 80, top_k=top_k)
    assert len(kept) <= top_k and len(set(kept)) == len(kept)
    assert all(0 <= x1 and x2 - x1 >= 1 and x2 <= 100 and 0 <= y1 and y2 - y1 >= 1 and y2 <= 80 for x1, y1, x2, y2 in kept)
    if len(kept) < top_k:
        assert len(kept) + dropped == len(candidates)


words_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40
)


@FUZZ
@given(text=words_text)
def test_fuzz_split_words_covers_every_non_space_character_once(text):
    words, spans = split_words(text)
    assert [text[s:e] for s, e in spans] == words
    assert all(e > s for s, e in spans) and all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
    covered = {i for s, e in spans for i in range(s, e)}
    assert {i for i, char in enumerate(text) if not char.isspace()} == covered


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(max_regions=4)


@SMALL_FUZZ
@given(
    texts=st.lists(words_text.filter(lambda text: split_words(text)[0]), min_size=1, max_size=3),
    proposals=st.lists(st.lists(boxes, max_size=6), min_size=3, max_size=3),
    size=st.tuples(st.integers(1, 60), st.integers(1, 60)),
    max_length=st.integers(3, 40),
)
def test_fuzz_processor_aligns_words_sub_words_and_regions(processor, texts, proposals, size, max_length):
    images = [Image.new("RGB", size, (30, 90, 150))] * len(texts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = refused_or_returns(lambda: processor(text=texts, images=images, boxes=proposals[: len(texts)],
                                                   max_length=max_length))
    if out is None:  # only a first word longer than max_length sub-words is refused
        assert max_length < 40
        return
    assert out["input_ids"].shape[1] <= max_length
    for b, text in enumerate(texts):
        words = out["words"][b]
        assert int(out["word_mask"][b].sum()) == len(words) >= 1
        assert set(out["word_ids"][b][out["word_ids"][b] >= 0].tolist()) == set(range(len(words)))
        for i, word in enumerate(words):
            start, end = out["word_offsets"][b, i].tolist()
            assert text[start:end] == word
        kept = out["region_boxes"][b][out["region_mask"][b]].tolist()
        expected, _ = sanitize_boxes(proposals[b], size[0], size[1], top_k=4)
        assert np.allclose(np.array(kept).reshape(-1, 4), np.array(expected, dtype=np.float32).reshape(-1, 4))
    assert torch.isfinite(out["pixel_values"]).all()


def encoded_image(fmt, mode, size):
    buffer = io.BytesIO()
    rng = np.random.default_rng(size[0] * 100 + size[1])
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


damaged_images = st.builds(
    lambda data, flips, keep: bytes(
        (byte ^ dict(flips).get(i, 0)) for i, byte in enumerate(data[: max(0, int(len(data) * keep))])
    ),
    st.builds(encoded_image, st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF"]), st.sampled_from(["RGB", "L"]),
              st.tuples(st.integers(1, 12), st.integers(1, 12))),
    st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=3),
    st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.1, 0.0]),
)


@SMALL_FUZZ
@given(data=damaged_images)
def test_fuzz_image_loader_reads_rgb_or_refuses_with_a_value_error(data):
    path = scratch_file(data, ".img")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's own notes on damaged TIFF/EXIF data
            image = refused_or_returns(lambda: load_rgb_image(path))
    finally:
        os.unlink(path)
    assert image is None or image.mode == "RGB"


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

small_box = st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(4, 7), st.integers(4, 7)).map(list)
gold_entity = st.fixed_dictionaries({"start": st.integers(0, 3), "end": st.integers(0, 2), "type": st.sampled_from("AB"),
                                     "boxes": st.lists(small_box, max_size=2)})
predicted_entity = st.fixed_dictionaries({"start": st.integers(0, 3), "end": st.integers(0, 2), "type": st.sampled_from("AB"),
                                          "box": st.none() | small_box})


@FUZZ
@given(
    gold=st.lists(st.lists(gold_entity, max_size=4), min_size=1, max_size=4),
    predicted=st.lists(st.lists(predicted_entity, max_size=4), min_size=4, max_size=4),
    seed=st.integers(0, 1000),
)
def test_fuzz_metrics_are_bounded_order_free_and_perfect_on_the_gold(gold, predicted, seed):
    fix = lambda entity: {**entity, "end": max(entity["start"], entity["end"])}  # noqa: E731
    references = [{"id": str(i), "entities": [fix(e) for e in entities]} for i, entities in enumerate(gold)]
    predictions = [{"id": str(i), "entities": [fix(e) for e in predicted[i]]} for i in range(len(gold))]
    result = evaluate_grounded_ner(predictions, references)
    for task in ("gmner", "mner", "eeg"):
        counts = result[task]["counts"]
        assert 0 <= counts["tp"] <= min(counts["n_pred"], counts["n_gold"])
        assert all(0.0 <= result[task][key] <= 1.0 for key in ("precision", "recall", "f1"))
    assert result["gmner"]["counts"]["tp"] <= result["mner"]["counts"]["tp"]
    assert result["gmner"]["counts"]["tp"] <= result["eeg"]["counts"]["tp"]
    rng = np.random.default_rng(seed)
    shuffled = [{"id": row["id"], "entities": [row["entities"][j] for j in rng.permutation(len(row["entities"]))]}
                for row in predictions[::-1]]
    assert evaluate_grounded_ner(shuffled, references) == result
    perfect = [{"id": row["id"], "entities": [{"start": e["start"], "end": e["end"], "type": e["type"],
                                               "box": e["boxes"][0] if e["boxes"] else None} for e in row["entities"]]}
               for row in references]
    best = evaluate_grounded_ner(perfect, references)["gmner"]
    n_gold = sum(len(row["entities"]) for row in references)
    assert best["counts"]["tp"] == n_gold and (n_gold == 0 or best["f1"] == 1.0)
