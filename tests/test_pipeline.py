"""The grounded-ner pipeline (docs/DESIGN.md §6-7) on a tiny random MQSPN, and examples/predict.py.

`save_tiny_checkpoint` and `export_tiny_checkpoint` also serve tests/test_export.py and tests/test_space.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, CLIPImageProcessor, pipeline

from conftest import load_script, tiny_config
from modeling_mqspn import MQSPNForGroundedNER
from modeling_mqspn.pipeline_mqspn import TASK, GroundedNERPipeline
from modeling_mqspn.processing_mqspn import MQSPNProcessor
from modeling_mqspn.proposers_mqspn import selective_search_available
from modeling_mqspn.visualize import type_color
from test_proposers import paint_scene

REPO = Path(__file__).resolve().parent.parent
VOCAB = (
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    + list("0123456789.,!?#@")
)
TWEET = "Messi lands in Paris with PSG"


def load_example(name):
    """Import examples/<name>.py as a module."""
    return load_script(f"examples/{name}.py", f"example_{name}")


def tiny_model_and_processor(seed=0):
    """A tiny random MQSPN whose existence head says yes to every query (classifier bias +6), so that
    decoding at the default threshold returns entities, and its processor (letter-level WordPiece
    vocabulary, 32-pixel CLIP crops)."""
    torch.manual_seed(seed)
    config = tiny_config()
    model = MQSPNForGroundedNER(config).eval()
    with torch.no_grad():
        model.classification_head.classifier.bias.fill_(6.0)
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(VOCAB)})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = MQSPNProcessor(
        image_processor=image_processor, tokenizer=tokenizer, entity_types=config.entity_types,
        max_regions=config.max_regions,
    )
    return model, processor


def save_tiny_checkpoint(folder, seed=0):
    """A training-style checkpoint: model and processor saved to one folder."""
    model, processor = tiny_model_and_processor(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def export_tiny_checkpoint(tmp_dir):
    """The tiny checkpoint exported by examples/push_to_hub.py --dry-run; returns (folder, eval JSON path)."""
    tmp_dir = Path(tmp_dir)
    checkpoint = save_tiny_checkpoint(tmp_dir / "checkpoint")
    eval_path = tmp_dir / "eval.json"
    eval_path.write_text(json.dumps({
        "gmner": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "per_type": {
            "PER": {"precision": 0.5, "recall": 0.5, "f1": 0.5}, "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0}}},
        "mner": {"precision": 0.75, "recall": 0.375, "f1": 0.5},
        "eeg": {"precision": 0.625, "recall": 0.3125, "f1": 0.4166666666666667},
    }))
    folder = tmp_dir / "hub"
    code = load_example("push_to_hub").main([
        "--model", checkpoint, "--eval-results", str(eval_path), "--repo-id", "someone/mqspn-tiny",
        "--dataset-name", "Twitter-GMNER", "--dataset-type", "twitter-gmner", "--dry-run", str(folder),
    ])
    assert code == 0
    return folder, eval_path


@pytest.fixture
def always_grounds(monkeypatch):
    """Make the tiny random model ground every entity: "no region" (index 0) never wins when the tweet has
    a proposal. Patches the class, so it also holds for models that examples/predict.py loads."""
    original = MQSPNForGroundedNER.forward

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        if outputs.region_logits.shape[-1] > 1:
            outputs.region_logits[..., 0] = -30.0
        return outputs

    monkeypatch.setattr(MQSPNForGroundedNER, "forward", forward)


@pytest.fixture(scope="module")
def grounded_ner():
    model, processor = tiny_model_and_processor()
    return pipeline(TASK, model=model, processor=processor, device="cpu")


@pytest.fixture
def photo(tmp_path):
    return paint_scene(tmp_path / "photo.jpg")


def check_entities(entities, text=None, words=None, boxes=None):
    """Every entity is a docs/DESIGN.md §7 dict consistent with its input."""
    assert entities, "the tiny model says yes to every query, so there are entities"
    spans = []
    for entity in entities:
        assert 0 <= entity["start"] <= entity["end"]
        assert entity["type"] in ("PER", "LOC", "ORG", "OTHER")
        assert 0.0 <= entity["score"] <= 1.0 and 0.0 <= entity["region_score"] <= 1.0
        if text is not None:
            assert entity["text"] == text[entity["char_start"] : entity["char_end"]]
        if words is not None:
            assert entity["text"] == " ".join(words[entity["start"] : entity["end"] + 1])
        if boxes is not None and entity["box"] is not None:
            assert entity["box"] in [[float(v) for v in box] for box in boxes]
        if boxes == []:
            assert entity["box"] is None
        spans.append(set(range(entity["start"], entity["end"] + 1)))
    for i, a in enumerate(spans):  # flat spans (docs/DESIGN.md §7)
        assert all(not a & b for b in spans[i + 1 :])


def test_task_is_registered_and_resolves_to_the_pipeline(grounded_ner):
    assert isinstance(grounded_ner, GroundedNERPipeline)


def test_single_inputs_text_words_and_given_boxes(grounded_ner, photo, always_grounds):
    boxes = [[0, 0, 80, 60], [20, 10, 150, 110], [60, 40, 100, 100]]
    entities = grounded_ner({"text": TWEET, "image": photo, "boxes": boxes})
    check_entities(entities, text=TWEET, boxes=boxes)
    assert all(entity["box"] is not None for entity in entities)

    words = TWEET.split()
    check_entities(grounded_ner({"words": words, "image": Image.open(photo), "boxes": boxes}), words=words, boxes=boxes)
    # Text only: no regions, so nothing is grounded.
    check_entities(grounded_ner({"text": TWEET}), text=TWEET, boxes=[])


def test_batches_give_the_same_results_as_single_calls(grounded_ner, photo):
    boxes = [[0, 0, 80, 60], [20, 10, 150, 110]]
    inputs = [
        {"text": TWEET, "image": photo, "boxes": boxes},
        {"words": ["Paris", "Saint", "Germain", "wins"], "image": photo, "boxes": boxes[:1]},
        {"text": "PSG wins again"},
        {"text": "Neymar is back", "image": photo, "boxes": []},
        {"text": TWEET, "image": photo, "boxes": [[30, 30, 120, 100]]},
    ]
    single = [grounded_ner(example) for example in inputs]
    batched = grounded_ner(inputs, batch_size=2)
    assert len(batched) == len(inputs)
    for one, many in zip(single, batched):
        assert [(e["start"], e["end"], e["type"], e["box"]) for e in one] == [
            (e["start"], e["end"], e["type"], e["box"]) for e in many
        ]
        assert np.allclose([e["score"] for e in one], [e["score"] for e in many], atol=1e-5)


def test_threshold_and_named_proposer(photo):
    model, processor = tiny_model_and_processor()
    with torch.no_grad():
        model.classification_head.classifier.bias.fill_(-20.0)  # now every query says no
    ner = pipeline(TASK, model=model, processor=processor, device="cpu",
                   proposer="boxes", proposer_kwargs={"boxes": [[10, 10, 90, 90], [50, 20, 150, 100]]})
    assert ner({"text": TWEET, "image": photo}) == []
    entities = ner({"text": TWEET, "image": photo}, threshold=0.0)
    check_entities(entities, text=TWEET, boxes=[[10, 10, 90, 90], [50, 20, 150, 100]])


def test_proposer_object_gets_the_image_path(photo):
    """A path input reaches the proposer as the path (the VinVL proposer finds its file by name)."""
    seen = []

    class Recording:
        def propose(self, image):
            seen.append(image)
            return [[5, 5, 50, 50]]

    model, processor = tiny_model_and_processor()
    ner = pipeline(TASK, model=model, processor=processor, device="cpu", proposer=Recording())
    check_entities(ner({"text": TWEET, "image": str(photo)}), text=TWEET, boxes=[[5, 5, 50, 50]])
    assert seen == [str(photo)]
    ner({"text": TWEET, "image": Image.open(photo)})
    assert isinstance(seen[-1], Image.Image)


def test_bad_inputs_have_clear_errors(grounded_ner, photo, tmp_path):
    with pytest.raises(TypeError, match="takes a dict"):
        grounded_ner(TWEET)
    with pytest.raises(ValueError, match="exactly one of 'text'"):
        grounded_ner({"image": photo})
    with pytest.raises(ValueError, match=r"unknown keys \['caption'\]"):
        grounded_ner({"text": TWEET, "caption": "x"})
    with pytest.raises(ValueError, match="'t7': .*neither an existing file"):
        grounded_ner({"id": "t7", "text": TWEET, "image": str(tmp_path / "missing.jpg"), "boxes": []})
    with pytest.raises(ValueError, match="'boxes' given without an 'image'"):
        grounded_ner({"text": TWEET, "boxes": [[0, 0, 5, 5]]})
    with pytest.raises(ValueError, match="threshold"):
        grounded_ner({"text": TWEET}, threshold=2.0)


def test_without_opencv_an_image_without_boxes_is_a_clear_error(photo, monkeypatch):
    import modeling_mqspn.pipeline_mqspn as pipeline_module

    monkeypatch.setattr(pipeline_module, "selective_search_available", lambda: False)
    model, processor = tiny_model_and_processor()
    ner = pipeline(TASK, model=model, processor=processor, device="cpu")
    with pytest.raises(ValueError, match="opencv-contrib-python-headless"):
        ner({"text": TWEET, "image": photo})


@pytest.mark.skipif(
    not selective_search_available(),
    reason="OpenCV contrib (cv2.ximgproc) is not installed: pip install opencv-contrib-python-headless",
)
def test_default_proposer_grounds_on_selective_search_boxes(grounded_ner, photo):
    from modeling_mqspn.proposers_mqspn import SelectiveSearchProposer

    boxes = SelectiveSearchProposer(top_k=grounded_ner.model.config.max_regions).propose(photo)
    check_entities(grounded_ner({"text": TWEET, "image": photo}), text=TWEET, boxes=boxes)


def test_predict_script_writes_jsonl_and_png_with_boxes(tmp_path, always_grounds):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    images = tmp_path / "inputs"
    images.mkdir()
    paint_scene(images / "a.jpg")
    paint_scene(images / "b.jpg", seed=1)
    boxes = [[10, 10, 70, 100], [80, 20, 150, 90], [30, 60, 120, 115]]
    lines = [
        {"id": "tweet/1", "text": TWEET, "image": "a.jpg", "boxes": boxes},
        {"words": ["PSG", "in", "Paris"], "image": str(images / "b.jpg"), "boxes": boxes[:2]},
        {"id": "no-image", "text": "Neymar is back"},
    ]
    jsonl = images / "tweets.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    predict = load_example("predict")
    assert predict.main(["--model", checkpoint, "--input", str(jsonl), "--output-dir", str(out), "--batch-size", "2"]) == 0

    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [record["id"] for record in records] == ["tweet/1", "2", "no-image"]
    check_entities(records[0]["entities"], text=TWEET, boxes=boxes)
    check_entities(records[1]["entities"], words=["PSG", "in", "Paris"], boxes=boxes[:2])
    check_entities(records[2]["entities"], text="Neymar is back", boxes=[])
    assert sorted(path.name for path in (out / "images").iterdir()) == ["2.png", "tweet_1.png"]

    grounded = [entity for entity in records[0]["entities"] if entity["box"] is not None]
    assert grounded
    original = np.asarray(Image.open(images / "a.jpg").convert("RGB")).astype(int)
    drawn = np.asarray(Image.open(out / "images" / "tweet_1.png").convert("RGB")).astype(int)
    assert drawn.shape[1] == original.shape[1] and drawn.shape[0] >= original.shape[0]
    for entity in grounded:
        x1, y1, x2, y2 = (int(v) for v in entity["box"])
        # The box's bottom edge is drawn in its type's colour (labels sit at the top); entities sharing a
        # box are drawn in turn, the last one's colour on top.
        last = [other for other in grounded if other["box"] == entity["box"]][-1]
        edge = drawn[y2 - 1, x1 + 2 : x2 - 2]
        assert (np.abs(edge - np.array(type_color(last["type"]))).sum(axis=1) <= 30).mean() > 0.5
    ungrounded = [entity for entity in records[0]["entities"] if entity["box"] is None]
    assert (drawn.shape[0] > original.shape[0]) == bool(ungrounded), "a footer lists the entities not in the image"


def test_predict_script_reports_bad_input_lines(tmp_path, capsys):
    """A bad line fails only itself (a row with its "error"); --strict makes the exit code say so."""
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x", "image": "nope.jpg"}) + "\n")
    predict = load_example("predict")
    assert predict.main(["--model", checkpoint, "--input", str(jsonl), "--output-dir", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert "entities" in rows[0] and f"{jsonl}:2: image" in rows[1]["error"]
    assert "1 failed" in capsys.readouterr().out
    assert predict.main(["--model", checkpoint, "--input", str(jsonl), "--output_dir", str(tmp_path / "o"), "--strict"]) == 1
    jsonl.write_text(json.dumps({"id": "a/b", "text": "ok"}) + "\n" + json.dumps({"id": "a_b", "text": "x"}) + "\n")
    assert predict.main(["--model", checkpoint, "--input", str(jsonl), "--output-dir", str(tmp_path / "o")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert "a_b.png of line 1" in rows[1]["error"]


def test_a_jsonl_text_tweet_and_the_same_string_in_the_pipeline_give_the_same_words(grounded_ner, tmp_path):
    """A model trained on JSONL "text" sees the words the pipeline makes of the same string at inference."""
    from modeling_mqspn.tools.data import load_jsonl

    text = "RT @Messi: lands in Paris!!  #PSG's new star (2024)"
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "t", "text": text, "entities": [{"start": 2, "end": 2, "type": "PER"}]}) + "\n")
    dataset, _ = load_jsonl(str(path), entity_types=["PER"])
    trained_on = dataset[0]["words"]
    assert trained_on[:4] == ["RT", "@", "Messi", ":"] and trained_on[2] == "Messi"
    inputs = grounded_ner.processor(text=text)
    assert inputs["words"] == [trained_on]
    entities = grounded_ner({"text": text})
    assert entities
    for entity in entities:  # word indices of a prediction are indices into the training words
        mention = text[entity["char_start"] : entity["char_end"]]
        assert mention.startswith(trained_on[entity["start"]]) and mention.endswith(trained_on[entity["end"]])


def test_predict_script_runs_the_model_in_bfloat16_on_request(tmp_path, monkeypatch, capsys):
    """--dtype bfloat16 loads the weights in bf16 (the forward sees a bf16 model) and gives the float32 run's
    rows, scores within bf16 rounding; float16 on the CPU is a usage error (exit 2) naming the fix."""
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint")
    jsonl = tmp_path / "tweets.jsonl"
    paint_scene(tmp_path / "a.jpg")
    lines = [{"id": str(i), "text": text} for i, text in enumerate([TWEET, "Neymar is back", "PSG in Paris"])]
    lines[0].update(image="a.jpg", boxes=[[10, 10, 70, 100], [80, 20, 150, 90]])  # crops through the bf16 tower
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    seen = []
    original = MQSPNForGroundedNER.forward

    def forward(self, *args, **kwargs):
        seen.append(self.dtype)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MQSPNForGroundedNER, "forward", forward)
    predict = load_example("predict")
    runs = {}
    for dtype in ("float32", "bfloat16"):
        seen.clear()
        out = tmp_path / dtype
        assert predict.main(["--model", checkpoint, "--input", str(jsonl), "--output_dir", str(out), "--dtype", dtype]) == 0
        assert set(seen) == {getattr(torch, dtype)}
        runs[dtype] = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in runs["bfloat16"]] == ["0", "1", "2"]
    compared = 0
    for full, half in zip(runs["float32"], runs["bfloat16"]):
        check_entities(half["entities"], text=full["text"])
        scores = {(e["start"], e["end"], e["type"]): e["score"] for e in full["entities"]}
        for entity in half["entities"]:
            key = (entity["start"], entity["end"], entity["type"])
            if key in scores:
                assert abs(entity["score"] - scores[key]) < 0.05
                compared += 1
    assert compared > 0
    capsys.readouterr()
    assert predict.main(["--model", checkpoint, "--text", "hi", "--output_dir", str(tmp_path / "h"), "--dtype", "float16"]) == 2
    assert "--dtype float16 needs a GPU" in capsys.readouterr().err
