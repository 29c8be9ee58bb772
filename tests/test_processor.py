"""MQSPNProcessor: words ↔ sub-words, raw strings, proposals and crops, region labels by IoU, missing images,
save/load (also through AutoProcessor with remote code) and post-processing to pixel boxes."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BertTokenizer, CLIPImageProcessor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modeling_mqspn.configuration_mqspn import MQSPNConfig  # noqa: E402
from modeling_mqspn.processing_mqspn import MQSPNProcessor, split_words  # noqa: E402
from modeling_mqspn.interface_mqspn import select_model_inputs  # noqa: E402

VOCAB = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the cat ##s sat on mat un ##happy obama visited paris rt @ : ' , ! "
    "new york is in"
).split()
CLS, SEP, UNK, PAD = 2, 3, 1, 0


def token_id(token):
    return VOCAB.index(token)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return BertTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def image_processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture
def processor(tokenizer, image_processor):
    return MQSPNProcessor(image_processor=image_processor, tokenizer=tokenizer, max_regions=3)


def solid_image(width=100, height=80, color=(200, 30, 30)):
    return Image.new("RGB", (width, height), color)


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------


def test_words_align_with_subwords_and_a_zero_width_word_gets_unk(processor):
    words = [["The", "cats", "\u200b", "sat", "Unhappy"], ["Obama", ""]]
    out = processor(words=words)
    expected = [CLS, token_id("the"), token_id("cat"), token_id("##s"), UNK, token_id("sat"), token_id("un"),
                token_id("##happy"), SEP]
    assert out["input_ids"][0].tolist() == expected
    assert out["word_ids"][0].tolist() == [-1, 0, 1, 1, 2, 3, 4, 4, -1]
    # The second tweet: its empty word also owns the unknown token; right padding with −1 word ids.
    assert out["input_ids"][1].tolist() == [CLS, token_id("obama"), UNK, SEP] + [PAD] * 5
    assert out["word_ids"][1].tolist() == [-1, 0, 1, -1] + [-1] * 5
    assert out["attention_mask"].tolist() == [[1] * 9, [1] * 4 + [0] * 5]
    assert out["token_type_ids"].tolist() == [[0] * 9, [0] * 9]
    assert out["word_mask"].dtype == torch.bool
    assert out["word_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    # Every real word owns at least one sub-word.
    for b in range(2):
        owned = set(out["word_ids"][b][out["word_ids"][b] >= 0].tolist())
        assert owned == set(range(int(out["word_mask"][b].sum())))
    assert out["words"] == words
    # A tweet whose only word is invisible still has it, as the unknown token.
    alone = processor(words=["\u200b"])
    assert alone["input_ids"].tolist() == [[CLS, UNK, SEP]] and alone["word_ids"].tolist() == [[-1, 0, -1]]


def test_truncation_warns_names_the_tweet_and_counts_lost_entities(tokenizer, image_processor):
    processor = MQSPNProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=6)
    words = ["the", "cats", "sat", "on", "the", "mat"]  # 1 + 2 + 1 + 1 + 1 + 1 sub-words
    entities = [
        {"start": 0, "end": 0, "type": "PER"},
        {"start": 2, "end": 3, "type": "LOC"},  # crosses the cut
        {"start": 5, "end": 5, "type": "ORG"},
    ]
    with pytest.warns(UserWarning, match=r"sample tweet-7: .*kept words 0\.\.2 of 6; 2 gold entities lost") as record:
        out = processor(words=words, entities=entities, ids="tweet-7")
    assert "(2 gold entities lost in total)" in str(record[0].message)
    assert out["input_ids"].shape == (1, 6)  # [CLS] the cat ##s sat [SEP]
    assert out["input_ids"][0, -1].item() == SEP
    assert out["word_mask"][0].tolist() == [True, True, True]
    assert out["words"] == [["the", "cats", "sat"]]
    label = out["labels"][0]
    assert label["start"].tolist() == [0] and label["end"].tolist() == [0] and label["id"] == "tweet-7"


def test_max_length_without_room_for_the_first_word_is_an_error(tokenizer, image_processor):
    processor = MQSPNProcessor(image_processor=image_processor, tokenizer=tokenizer, max_length=3)
    with pytest.raises(ValueError, match="sample #0: max_length=3 leaves no room"):
        processor(words=["cats"])


def test_raw_strings_are_split_with_character_offsets(processor):
    texts = ["RT @obama: the cat's mat!", "new  york"]
    out = processor(text=texts)
    assert out["words"][0] == ["RT", "@", "obama", ":", "the", "cat", "'", "s", "mat", "!"]
    assert out["words"][1] == ["new", "york"]
    offsets = out["word_offsets"]
    assert offsets.shape == (2, 10, 2)
    for b, text in enumerate(texts):
        for i, word in enumerate(out["words"][b]):
            start, end = offsets[b, i].tolist()
            assert text[start:end] == word
    assert offsets[1, 1].tolist() == [5, 9]
    assert (offsets[1, 2:] == -1).all()
    assert out["text"] == texts
    assert split_words("a_b #tag\u200b") == (
        ["a", "_", "b", "#", "tag", "\u200b"], [(0, 1), (1, 2), (2, 3), (4, 5), (5, 8), (8, 9)]
    )


def test_entity_errors_name_the_sample(processor):
    with pytest.raises(ValueError, match=r"sample t1, entity 0: unknown entity type 'PERSON'; the label space is"):
        processor(words=["obama"], entities=[{"start": 0, "end": 0, "type": "PERSON"}], ids="t1")
    with pytest.raises(ValueError, match=r"sample t2, entity 1: start/end must be word indices with 0 <= start <= end < 2 \(inclusive end\), got 0, 3"):
        processor(words=["obama", "sat"], ids="t2", entities=[
            {"start": 0, "end": 0, "type": "PER"}, {"start": 0, "end": 3, "type": "PER"}])


# ------------------------------------------------------------------------------------------------
# Regions
# ------------------------------------------------------------------------------------------------


def test_fewer_zero_and_more_than_k_proposals(processor):
    image = solid_image()
    few = [[0, 0, 50, 50], [10, 10, 90, 70]]
    many = [[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10], [40, 0, 50, 10]]
    out = processor(words=[["a"], ["b"], ["c"]], images=[image, image, image], boxes=[few, [], many])
    assert out["region_mask"].dtype == torch.bool
    assert out["region_mask"].tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert out["pixel_values"].shape == (3, 3, 3, 32, 32)
    assert out["region_boxes"][2].tolist() == many[:3]  # detector order, first k
    assert out["region_boxes"][0, :2].tolist() == few
    assert (out["pixel_values"][0, 2] == 0).all() and (out["pixel_values"][1] == 0).all()
    assert out["image_sizes"].tolist() == [[100, 80]] * 3

    alone = processor(words=["a"], images=image, boxes=[])
    assert alone["region_mask"].shape == (1, 0)
    assert alone["pixel_values"].shape == (1, 0, 3, 32, 32)
    assert alone["region_boxes"].shape == (1, 0, 4)


def test_proposals_are_clipped_and_bad_boxes_dropped_with_a_count(processor):
    boxes = [[-10, -5, 50, 200], [0, 0, 50, 80], [5, 5, 5.5, 40], [float("nan"), 0, 1, 1], [60, 0, 90, 30]]
    with pytest.warns(UserWarning, match=r"dropped 3 non-finite, degenerate or duplicate .* in 1 tweet\(s\): t9 \(3\)"):
        out = processor(words=["a"], images=solid_image(), boxes=boxes, ids="t9")
    # The first box clipped to the image equals the second one, which is then a duplicate.
    assert out["region_boxes"][0].tolist() == [[0, 0, 50, 80], [60, 0, 90, 30]]


def test_proposals_come_from_a_proposer_not_from_the_processor(processor, tmp_path):
    from modeling_mqspn.proposers_mqspn import VinVLProposer

    solid_image().save(tmp_path / "77.jpg")
    np.savez(tmp_path / "77.jpg.npz", num_boxes=np.int64(2), bounding_boxes=np.array(
        [[0, 0, 40, 40], [20, 20, 60, 60]], dtype=np.float32), scores=np.array([0.2, 0.9], dtype=np.float32))
    proposer = VinVLProposer(str(tmp_path), top_k=3)
    boxes = proposer.propose(str(tmp_path / "77.jpg"))
    out = processor(words=["a"], images=str(tmp_path / "77.jpg"), boxes=boxes)
    assert out["region_boxes"][0].tolist() == [[20, 20, 60, 60], [0, 0, 40, 40]]  # by descending score
    # A proposer object or a file path where boxes belong is refused with the way to resolve it.
    with pytest.raises(TypeError, match=r"sample #0: `boxes` takes pixel boxes, not VinVLProposer; .*get_proposer"):
        processor(words=["a"], images=str(tmp_path / "77.jpg"), boxes=proposer)
    with pytest.raises(TypeError, match=r"sample #0: `boxes` takes pixel boxes, not str"):
        processor(words=["a"], images=str(tmp_path / "77.jpg"), boxes=str(tmp_path / "77.jpg.npz"))


def test_boxes_without_an_image_are_an_error(processor):
    with pytest.raises(ValueError, match="sample x: candidate boxes were given but no image"):
        processor(words=[["a"], ["b"]], images=[solid_image(), None], boxes=[[], [[0, 0, 5, 5]]], ids=["w", "x"])


def test_missing_or_unreadable_images_give_no_proposals_and_a_counted_warning(processor, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    good = tmp_path / "good.png"
    solid_image().save(good)
    boxes = [[[0, 0, 50, 50]]] * 3
    entities = [[{"start": 0, "end": 0, "type": "PER", "boxes": [[0, 0, 50, 50]]}]] * 3
    with pytest.warns(UserWarning, match=r"2 of 3 image\(s\) could not be read") as record:
        out = processor(words=[["a"], ["b"], ["c"]], images=[str(good), str(tmp_path / "gone.jpg"), str(broken)],
                        boxes=boxes, entities=entities, ids=["ok", "gone", "broken"])
    message = str(record[0].message)
    assert "gone (" in message and "gone.jpg" in message and "broken (" in message and "broken.jpg" in message
    assert "ok (" not in message
    assert out["region_mask"].tolist() == [[True], [False], [False]]
    assert out["image_sizes"].tolist() == [[100, 80], [0, 0], [0, 0]]
    assert [label["regions"].tolist() for label in out["labels"]] == [[[False, True]], [[True, False]], [[True, False]]]


def test_images_are_read_upright(processor, tmp_path):
    path = tmp_path / "rotated.jpg"
    image = solid_image(100, 50)
    exif = image.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
    image.save(path, exif=exif)
    out = processor(words=["a"], images=str(path), boxes=[[0, 0, 40, 90]])
    assert out["image_sizes"].tolist() == [[50, 100]]
    assert out["region_boxes"][0].tolist() == [[0, 0, 40, 90]]  # not clipped to the stored 100×50


def test_region_labels_are_multi_hot_by_iou(processor):
    image = solid_image(100, 100)
    proposals = [[0, 0, 50, 50], [50, 50, 100, 100], [0, 0, 100, 100]]
    entities = [
        {"start": 0, "end": 0, "type": "PER", "boxes": [[0, 0, 50, 60]]},  # IoU .83 / 0 / .3
        {"start": 1, "end": 1, "type": "LOC", "boxes": [[50, 50, 100, 100], [0, 0, 100, 90]]},  # slots 2 and 3
        {"start": 2, "end": 2, "type": "ORG", "boxes": []},  # not groundable
        {"start": 3, "end": 3, "type": "OTHER", "boxes": [[0, 0, 50, 100]]},  # IoU exactly 0.5 with slots 1, 3
        {"start": 4, "end": 4, "type": "PER", "boxes": [[80, 0, 100, 20]]},  # no proposal covers it
    ]
    out = processor(words=[["a"] * 5, ["b"]], images=[image, image], boxes=[proposals, [[0, 0, 10, 10]]],
                    entities=[entities, [{"start": 0, "end": 0, "type": "LOC", "boxes": [[0, 0, 10, 10]]}]],
                    ids=["one", "two"])
    first, second = out["labels"]
    assert first["regions"].dtype == torch.bool
    assert first["regions"].tolist() == [
        [False, True, False, False],
        [False, False, True, True],
        [True, False, False, False],
        [False, True, False, True],
        [True, False, False, False],
    ]
    assert first["type"].tolist() == [0, 1, 2, 3, 0] and first["start"].tolist() == [0, 1, 2, 3, 4]
    assert second["regions"].tolist() == [[False, True, False, False]]  # padded to the batch's K + 1
    assert second["id"] == "two"


def test_prepare_crops_pad_keeps_a_tall_box_whole_and_center_cuts_it(processor, tokenizer, image_processor):
    image = Image.new("RGB", (40, 100), (0, 0, 255))
    image.paste((0, 255, 0), (10, 0, 20, 10))  # green top of a tall 10×60 box
    image.paste((255, 0, 0), (10, 10, 20, 60))  # red rest of it
    box = [[10, 0, 20, 60]]
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]

    def greenish_pixels(crops):
        rgb = crops[0] * std + mean  # (3, 32, 32) in [0, 1]
        return int(((rgb[1] > 0.6) & (rgb[0] < 0.4)).sum())

    padded = processor.prepare_crops(image, box)
    assert padded.shape == (1, 3, 32, 32) and padded.dtype == torch.float32
    assert greenish_pixels(padded) > 0
    # Padding is the image processor's mean colour, i.e. 0 after normalisation.
    assert padded[0, :, 16, 0].abs().max() < 0.05

    centre = MQSPNProcessor(image_processor=image_processor, tokenizer=tokenizer, crop_mode="center")
    assert greenish_pixels(centre.prepare_crops(image, box)) == 0
    assert processor.prepare_crops(image, []).shape == (0, 3, 32, 32)


def test_region_features_replace_images(processor):
    torch.manual_seed(0)
    features = [torch.randn(2, 24), torch.randn(0, 24), torch.randn(5, 24)]
    boxes = [[[0, 0, 5, 5], [1, 1, 9, 9]], [], [[i, 0, i + 4, 4] for i in range(5)]]
    out = processor(words=[["a"], ["b"], ["c"]], region_features=features, boxes=boxes,
                    image_sizes=[(10, 10), None, (20, 20)])
    assert "pixel_values" not in out
    assert out["region_features"].shape == (3, 3, 24)
    assert torch.equal(out["region_features"][0, :2], features[0])
    assert torch.equal(out["region_features"][2], features[2][:3])
    assert out["region_mask"].tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert out["region_boxes"][2].tolist() == boxes[2][:3]
    assert out["image_sizes"].tolist() == [[10, 10], [0, 0], [20, 20]]
    with pytest.raises(ValueError, match="sample #0: 2 region_features rows but 1 boxes"):
        processor(words=["a"], region_features=features[0], boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="either `images`"):
        processor(words=["a"], region_features=features[0], images=solid_image(), boxes=boxes[0])


def test_to_moves_labels_and_never_casts_boxes(processor):
    out = processor(words=["a", "b"], images=solid_image(), boxes=[[0, 0, 50, 50]],
                    entities=[{"start": 0, "end": 1, "type": "PER", "boxes": [[0, 0, 50, 50]]}], ids="t")
    moved = out.to("cpu")
    assert isinstance(moved["labels"], list) and moved["labels"][0]["regions"].tolist() == [[False, True]]
    assert moved["labels"][0]["id"] == "t"
    half = out.to(torch.float16)
    assert half["pixel_values"].dtype == torch.float16
    assert half["region_boxes"].dtype == torch.float32
    assert half["labels"][0]["start"].dtype == torch.long
    assert set(select_model_inputs(out)) == {"input_ids", "attention_mask", "token_type_ids", "word_ids", "word_mask",
                                       "pixel_values", "region_mask", "labels"}


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------


def processor_attributes(processor):
    return {name: getattr(processor, name) for name in (
        "entity_types", "max_regions", "crop_mode", "region_iou_threshold", "max_length")}


@pytest.fixture
def custom_processor(tokenizer, image_processor):
    return MQSPNProcessor(
        image_processor=image_processor, tokenizer=tokenizer, entity_types=["person", "place"], max_regions=5,
        crop_mode="center", region_iou_threshold=0.6, max_length=64,
    )


def assert_same_outputs(first, second):
    kwargs = dict(words=["the", "cats", "\u200b"], images=solid_image(), boxes=[[0, 0, 60, 30], [10, 10, 90, 70]])
    a, b = first(**kwargs), second(**kwargs)
    for key in ("input_ids", "word_ids", "pixel_values", "region_boxes"):
        assert torch.equal(a[key], b[key]), key


def test_save_and_load_round_trip(custom_processor, tmp_path):
    custom_processor.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file()
    loaded = MQSPNProcessor.from_pretrained(tmp_path)
    assert processor_attributes(loaded) == processor_attributes(custom_processor)
    assert loaded.image_processor.crop_size == custom_processor.image_processor.crop_size
    assert_same_outputs(custom_processor, loaded)


def test_auto_processor_with_remote_code(custom_processor, tmp_path, monkeypatch):
    """Saved with the package, loaded by AutoProcessor from the modules copied into the folder, with the package
    made unimportable (as for a user who has only the checkpoint)."""
    import modeling_mqspn  # registers MQSPNProcessor for AutoProcessor

    assert modeling_mqspn.MQSPNProcessor._auto_class == "AutoProcessor"
    folder = tmp_path / "mqspn_processor_remote"
    custom_processor.save_pretrained(folder)
    for module in ("processing_mqspn.py", "box_ops.py", "decoding_mqspn.py", "interface_mqspn.py"):
        assert (folder / module).is_file(), module
    monkeypatch.setitem(sys.modules, "modeling_mqspn", None)
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "MQSPNProcessor"
    assert type(loaded).__module__.startswith("transformers_modules")
    assert processor_attributes(loaded) == processor_attributes(custom_processor)
    assert_same_outputs(custom_processor, loaded)


def test_build_from_tokenizer_and_image_processor_folders(tokenizer, image_processor, tmp_path):
    tokenizer.save_pretrained(tmp_path / "text")
    image_processor.save_pretrained(tmp_path / "vision")
    config = type("Config", (), dict(entity_types=["a", "b"], max_regions=7, existence_threshold=0.4, max_span_words=3))
    built = MQSPNProcessor.from_tokenizer_and_image_processor(tmp_path / "text", tmp_path / "vision", config=config,
                                                               crop_mode="center")
    assert processor_attributes(built) == dict(entity_types=["a", "b"], max_regions=7, crop_mode="center",
                                               region_iou_threshold=0.5, max_length=512)
    assert built(words=["cats"])["input_ids"].tolist() == [[CLS, token_id("cat"), token_id("##s"), SEP]]


# ------------------------------------------------------------------------------------------------
# Post-processing
# ------------------------------------------------------------------------------------------------


# The decoding fields of a model config (`post_process_grounded_ner` reads them from the config it is given).
DECODING = MQSPNConfig(existence_threshold=0.5, max_span_words=10)


def fake_outputs(batch_size, num_words, num_regions, picks, num_queries=8):
    """Logits where query q of tweet b (type q mod 4) finds span (s, e) with region r for each (b, q, s, e, r) in
    picks, and every other query finds nothing."""
    existence = torch.full((batch_size, num_queries), -10.0)
    start = torch.full((batch_size, num_queries, num_words), -10.0)
    end = torch.full((batch_size, num_queries, num_words), -10.0)
    region = torch.full((batch_size, num_queries, num_regions + 1), -10.0)
    for b, q, s, e, r in picks:
        existence[b, q], start[b, q, s], end[b, q, e], region[b, q, r] = 4.0, 6.0, 6.0, 3.0
    return {"existence_logits": existence, "start_logits": start, "end_logits": end, "region_logits": region,
            "query_types": torch.arange(num_queries) % 4}


def test_post_processing_maps_regions_to_pixel_boxes(processor):
    words = [["obama", "visited", "new", "york"], ["the", "cat"]]
    boxes = [[[0, 0, 40, 40], [50, 20, 90, 70]], [[5, 5, 25, 25]]]
    inputs = processor(words=words, images=[solid_image(), solid_image()], boxes=boxes)
    outputs = fake_outputs(2, 4, 2, picks=[(0, 0, 0, 0, 2), (0, 1, 2, 3, 0), (1, 4, 1, 1, 1)])
    results = processor.post_process_grounded_ner(outputs, inputs, DECODING)
    assert [(e["text"], e["type"], e["start"], e["end"], e["box"]) for e in results[0]] == [
        ("obama", "PER", 0, 0, [50.0, 20.0, 90.0, 70.0]),
        ("new york", "LOC", 2, 3, None),
    ]
    assert [(e["text"], e["type"], e["box"]) for e in results[1]] == [("cat", "PER", [5.0, 5.0, 25.0, 25.0])]
    entity = results[0][0]
    existence, boundary, region = torch.sigmoid(torch.tensor([4.0, 6.0, 3.0])).tolist()
    assert entity["score"] == pytest.approx(existence * boundary)  # P^c · sqrt(P^s · P^e)
    assert entity["region_score"] == pytest.approx(region)
    assert "char_start" not in entity
    # A higher threshold than every existence probability keeps nothing.
    assert processor.post_process_grounded_ner(outputs, inputs, DECODING, threshold=0.99) == [[], []]


def test_post_processing_of_raw_strings_points_into_the_string(processor):
    text = "RT @obama: visited New York!"
    inputs = processor(text=text, images=solid_image(), boxes=[[0, 0, 40, 40]])
    assert inputs["words"][0][5:7] == ["New", "York"]
    outputs = fake_outputs(1, 8, 1, picks=[(0, 1, 5, 6, 1), (0, 0, 2, 2, 0)])
    results = processor.post_process_grounded_ner(outputs, inputs, DECODING)
    assert [(e["text"], e["char_start"], e["char_end"], e["type"], e["box"]) for e in results[0]] == [
        ("obama", 4, 9, "PER", None),
        ("New York", 19, 27, "LOC", [0.0, 0.0, 40.0, 40.0]),
    ]
    for entity in results[0]:
        assert text[entity["char_start"]:entity["char_end"]] == entity["text"]


def test_the_model_takes_the_processor_output(processor):
    """End to end with a tiny model: pixel crops, labels, loss, and entities back, also with no proposal at all."""
    from conftest import tiny_config

    from modeling_mqspn import MQSPNForGroundedNER

    torch.manual_seed(0)
    model = MQSPNForGroundedNER(tiny_config(max_regions=3)).eval()
    inputs = processor(
        words=[["obama", "visited", "new", "york"], ["the", "cat"]], images=[solid_image(), None],
        boxes=[[[0, 0, 50, 50], [10, 10, 90, 70]], None], ids=["a", "b"],
        entities=[[{"start": 0, "end": 0, "type": "PER", "boxes": [[0, 0, 50, 50]]}], []],
    )
    outputs = model(**inputs)
    assert torch.isfinite(outputs.loss)
    assert outputs.region_logits.shape == (2, 8, 3)
    results = processor.post_process_grounded_ner(outputs, inputs, threshold=0.0, config=model.config)
    assert len(results) == 2 and results[0]
    for tweet, (words, boxes) in enumerate(zip(inputs["words"], inputs["region_boxes"].tolist())):
        for entity in results[tweet]:
            assert entity["text"] == " ".join(words[entity["start"]:entity["end"] + 1])
            assert entity["box"] is None or entity["box"] in boxes[: int(inputs["region_mask"][tweet].sum())]
    assert all(entity["box"] is None for entity in results[1])  # the tweet without an image
    empty = processor(text="obama visited", images=solid_image(), boxes=[])
    outputs = model(**empty)  # the whole output, post-processing keys included, is accepted as keywords
    assert outputs.region_logits.shape == (1, 8, 1)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bogus'\\]"):
        model(**empty, bogus=1)
    assert all(entity["box"] is None for entity in processor.post_process_grounded_ner(outputs, empty, DECODING, 0.0)[0])
