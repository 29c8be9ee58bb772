"""Unusual text (docs/robustness.md, "Text") through `MQSPNProcessor` and the grounded-ner pipeline, and a
pipeline batch that mixes good and bad inputs."""

import unicodedata
import warnings

import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_mqspn.pipeline_mqspn import TASK
from modeling_mqspn.processing_mqspn import split_words
from test_pipeline import tiny_model_and_processor
from test_robustness_images import tiny_processor

UNK = 1

TEXTS = {
    "zero-width": "Messi\u200bin Paris\ufeff \u200d",
    "right-to-left": "\u0645\u064a\u0633\u064a \u0641\u064a \u0628\u0627\u0631\u064a\u0633 \u200fParis",
    "emoji": "I \u2764\ufe0f Paris \U0001F468\u200d\U0001F469\u200d\U0001F467 \U0001F1EB\U0001F1F7",
    "combining": "Zu\u0308rich cafe\u0301 \u0939\u093f\u0928\u094d\u0926\u0940 Messi",
    "control": "Messi\x00in\x07Paris \x1b[31m \x7f\x85 ok\r\n",
}


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def ner():
    model, processor = tiny_model_and_processor()
    return pipeline(TASK, model=model, processor=processor, device="cpu")


def check_alignment(out, texts):
    """Every kept word is the text between its offsets and owns at least one sub-word."""
    for b, text in enumerate(texts):
        words = out["words"][b]
        assert int(out["word_mask"][b].sum()) == len(words)
        for i, word in enumerate(words):
            start, end = out["word_offsets"][b, i].tolist()
            assert text[start:end] == word
        owned = out["word_ids"][b][out["word_ids"][b] >= 0]
        assert set(owned.tolist()) == set(range(len(words)))


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_unusual_characters_keep_words_offsets_and_subwords_aligned(processor, ner, kind):
    text = TEXTS[kind]
    out = processor(text=text)
    check_alignment(out, [text])
    entities = ner({"text": text})
    assert entities, "the tiny pipeline model says yes to every query"
    for entity in entities:
        assert entity["text"] == text[entity["char_start"] : entity["char_end"]]
        assert entity["end"] < len(out["words"][0])


def test_zero_width_and_control_characters_are_words_that_become_the_unknown_token(processor):
    words, _ = split_words(TEXTS["zero-width"])
    assert words == ["Messi", "\u200b", "in", "Paris", "\ufeff", "\u200d"]
    out = processor(text=TEXTS["zero-width"])
    for index in (1, 4, 5):
        assert out["input_ids"][0][out["word_ids"][0] == index].tolist() == [UNK]
    words, _ = split_words(TEXTS["control"])
    assert words[:5] == ["Messi", "\x00", "in", "\x07", "Paris"] and words[-1] == "ok"
    out = processor(text=TEXTS["control"])
    assert out["input_ids"][0][out["word_ids"][0] == 1].tolist() == [UNK]


def test_right_to_left_words_stay_whole_in_logical_order():
    words, spans = split_words(TEXTS["right-to-left"])
    assert words == ["\u0645\u064a\u0633\u064a", "\u0641\u064a", "\u0628\u0627\u0631\u064a\u0633", "\u200f", "Paris"]
    assert spans[0] == (0, 4)


def test_emoji_keep_their_variation_selector_and_zwj_sequences_split_at_the_joiner():
    words, _ = split_words(TEXTS["emoji"])
    assert words[1] == "\u2764\ufe0f"  # the variation selector is a combining mark of the heart
    assert words[3:8] == ["\U0001F468", "\u200d", "\U0001F469", "\u200d", "\U0001F467"]
    assert words[8:] == ["\U0001F1EB", "\U0001F1F7"]  # a flag is two regional indicators, two words


def test_combining_marks_stay_in_their_word_decomposed_or_composed():
    text = TEXTS["combining"]
    words, spans = split_words(text)
    assert words == ["Zu\u0308rich", "cafe\u0301", "\u0939\u093f\u0928\u094d\u0926\u0940", "Messi"]
    assert [text[s:e] for s, e in spans] == words
    composed = unicodedata.normalize("NFC", text)
    assert [unicodedata.normalize("NFC", w) for w in words] == split_words(composed)[0]
    # A mark after punctuation stays with the punctuation and does not glue the next word to it.
    assert split_words("!\u0301abc, e\u0301,")[0] == ["!\u0301", "abc", ",", "e\u0301", ","]


@pytest.mark.parametrize("text", ["", "   ", " \t\n\u00a0\u3000 "])
def test_empty_or_whitespace_text_is_a_clear_processor_error_and_no_pipeline_entity(processor, ner, text):
    with pytest.raises(ValueError, match="sample t9 has no words"):
        processor(text=text, ids="t9")
    with pytest.raises(ValueError, match="sample t9 has no words"):
        processor(words=[], ids="t9")
    assert ner({"text": text}) == []
    assert ner({"words": []}) == []
    assert ner([{"text": text}, {"text": "Messi"}])[0] == []


def test_five_thousand_words_are_truncated_with_a_warning_that_counts_lost_entities(processor, ner):
    words = [f"w{i % 10}" for i in range(5000)]
    text = " ".join(words)
    entities = [{"start": 1, "end": 1, "type": "PER"}, {"start": 4999, "end": 4999, "type": "LOC"}]
    with pytest.warns(UserWarning, match=r"sample long: .*kept words 0\.\.\d+ of 5000; 1 gold entities lost") as record:
        out = processor(text=text, entities=entities, ids="long")
    assert "exceed max_length=512" in str(record[0].message)
    assert out["input_ids"].shape[1] <= 512
    kept = len(out["words"][0])
    assert 0 < kept < 5000 and out["labels"][0]["start"].tolist() == [1]
    check_alignment(out, [text])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = ner({"text": text})
    # The pipeline truncates to the text encoder's positions (64 in the tiny model), not to the processor's 512.
    positions = ner.model.config.text_config.max_position_embeddings
    assert positions < kept and found and all(entity["end"] < positions - 2 for entity in found)


def test_pipeline_batch_mixing_good_and_bad_items_returns_good_results_and_per_item_errors(ner, tmp_path):
    torch.manual_seed(0)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (120, 40, 200)).save(photo)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    good = [
        {"id": "g1", "text": "Messi lands in Paris"},
        {"id": "g2", "words": ["Messi", "in", "Paris"], "image": str(photo), "boxes": [[0, 0, 30, 30]]},
        {"id": "g3", "text": "PSG wins", "image": str(photo), "boxes": [[5, 5, 60, 40]]},
    ]
    bad = {
        "b1": {"id": "b1", "text": "Messi", "image": str(broken), "boxes": []},  # unreadable image
        "b2": {"id": "b2", "text": "Messi", "caption": "?"},  # unknown key
        "b3": {"id": "b3", "text": "Messi", "image": str(photo), "boxes": [[1, 2, 3]]},  # malformed boxes
        "b4": {"id": "b4", "text": 42},  # not a string
    }
    items = [good[0], bad["b1"], good[1], bad["b2"], bad["b3"], good[2], bad["b4"]]
    expected = {example["id"]: ner(example) for example in good}
    for batch_size in (1, 4):
        results = ner(items, batch_size=batch_size)
        assert len(results) == len(items)
        for item, result in zip(items, results):
            if item["id"] in expected:
                assert result == expected[item["id"]]
            else:
                assert set(result) == {"id", "error"} and result["id"] == item["id"]
        errors = {result["id"]: result["error"] for result in results if isinstance(result, dict)}
        assert errors["b1"].startswith("ValueError: 'b1': image file") and "broken.jpg" in errors["b1"]
        assert errors["b2"].startswith("ValueError: 'b2': unknown keys ['caption']")
        assert errors["b3"].startswith("ValueError: sample b3: boxes must be a list of [x1, y1, x2, y2]")
        assert errors["b4"].startswith("TypeError: 'b4': 'text' must be a string")
    # A single bad input still raises its error.
    with pytest.raises(ValueError, match="sample b3: boxes must be"):
        ner(bad["b3"])
    with pytest.raises(TypeError, match="takes a dict"):
        ner("Messi")
