"""Regions for any photo collection (issue #14): proposing for a folder of photos in the VinVL layout
(``tools/regions.py``, ``processing/propose_regions.py``), the OWLv2-objectness and Grounding DINO
proposers on tiny random models saved to local folders, the coverage report (the EEG / GMNER ceiling),
and the JSONL reader taking proposals from a proposals folder."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mqspn import MQSPNConfig
from modeling_mqspn.box_ops import box_iou, sanitize_scored_boxes
from modeling_mqspn.proposers_mqspn import (
    DetectorProposer,
    GivenBoxesProposer,
    GroundingDinoProposer,
    Owlv2ObjectnessProposer,
    SelectiveSearchProposer,
    VinVLProposer,
    get_proposer,
    grounding_prompt,
    selective_search_available,
)
from modeling_mqspn.tools.data import load_jsonl
from modeling_mqspn.tools.regions import (
    MANIFEST_NAME,
    coverage_report,
    format_coverage_table,
    proposal_coverage_of_rows,
    propose_folder,
    report_proposal_coverage,
    write_proposal_file,
)
from modeling_mqspn.vinvl_mqspn import load_vinvl_proposals
from conftest import load_script
from test_proposers import paint_scene, tiny_yolos

ROOT = Path(__file__).resolve().parents[1]
K = 4
HUGE = (4000, 3000)


def load_propose_regions():
    return load_script("processing/propose_regions.py", "propose_regions")


def assert_scored_valid(boxes, scores, width, height, k=K):
    assert 0 < len(boxes) <= k and len(scores) == len(boxes)
    assert scores == sorted(scores, reverse=True), "boxes must be sorted by descending score"
    for box in boxes:
        x1, y1, x2, y2 = box
        assert all(np.isfinite(box)) and 0 <= x1 and x2 <= width and 0 <= y1 and y2 <= height, box
        assert x2 - x1 >= 1 and y2 - y1 >= 1, box
    assert len({tuple(b) for b in boxes}) == len(boxes)


# --------------------------------------------------------------------------------------------------
# Tiny random detectors, saved to local folders (no download)


def tiny_owlv2(folder, seed=0):
    from transformers import Owlv2Config, Owlv2ForObjectDetection
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    torch.manual_seed(seed)
    config = Owlv2Config(
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8),
        projection_dim=16,
    )
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():  # boxes near the patch grid (the box bias), jittered: valid, distinct, overlapping
        model.box_head.dense2.weight.mul_(0.05)
        model.box_head.dense2.bias.zero_()
    model.save_pretrained(folder)
    Owlv2ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_grounding_dino(folder, seed=0):
    from transformers import BertConfig, BertTokenizerFast, GroundingDinoConfig, GroundingDinoForObjectDetection
    from transformers import GroundingDinoProcessor, SwinConfig
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage2", "stage3", "stage4"])
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "person", "location", "organization", "thing", "other"]
    text = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, num_queries=12, encoder_layers=1, decoder_layers=2, d_model=32,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=1, decoder_n_points=1, max_text_len=32,
    )
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    vocab = Path(folder) / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detectors(tmp_path_factory):
    root = tmp_path_factory.mktemp("detectors")
    return {
        "yolos": tiny_yolos(str(root / "yolos")),
        "owlv2": tiny_owlv2(str(root / "owlv2")),
        "grounding-dino": tiny_grounding_dino(str(root / "grounding-dino")),
    }


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return [str(paint_scene(root / "wide.jpg", 160, 120, seed=1)), str(paint_scene(root / "tall.jpg", 90, 140, seed=2))]


# --------------------------------------------------------------------------------------------------
# Each proposer: at most k valid boxes, sorted by score, clipped to the image


def test_sanitize_scored_boxes_sorts_clips_suppresses_and_ranks():
    boxes = [[0, 0, 10, 10], [-5, -5, 50, 50], [0, 0, 10, 10], [1, 1, 10.5, 10], [20, 20, 20.2, 30], [5, 5, 8, 8]]
    scores = [0.9, 0.95, 0.5, 0.8, 0.99, float("nan")]
    kept, kept_scores, dropped = sanitize_scored_boxes(boxes, scores, 40, 40, top_k=3)
    # Descending score: the thin box (0.99) is degenerate, the 0.95 box clipped, the duplicate (0.5) dropped.
    assert kept == [(0.0, 0.0, 40.0, 40.0), (0.0, 0.0, 10.0, 10.0), (1.0, 1.0, 10.5, 10.0)]
    assert kept_scores == [0.95, 0.9, 0.8] and dropped == 1
    kept, _, dropped = sanitize_scored_boxes(boxes, scores, 40, 40, top_k=3, nms_iou=0.5)
    assert kept == [(0.0, 0.0, 40.0, 40.0), (0.0, 0.0, 10.0, 10.0)]  # (1, 1, 10.5, 10) overlaps (0, 0, 10, 10)
    kept, kept_scores, _ = sanitize_scored_boxes(boxes[:2], None, 40, 40)
    assert kept == [(0.0, 0.0, 10.0, 10.0), (0.0, 0.0, 40.0, 40.0)] and kept_scores == [1.0, 0.5]  # rank scores


def test_detector_proposer_batches_and_returns_scored_top_k(detectors, scenes):
    proposer = get_proposer("detector", top_k=K, model=detectors["yolos"])
    results = proposer.propose_scored(scenes)
    for scene, (boxes, scores) in zip(scenes, results):
        width, height = Image.open(scene).size
        assert_scored_valid(boxes, scores, width, height)
    # The single-image path gives the single-image batch's boxes.
    assert proposer.propose(scenes[0]) == proposer.propose_scored(scenes[:1])[0][0]


def test_owlv2_objectness_proposer_top_k_sorted_clipped_and_suppressed(detectors, scenes):
    proposer = get_proposer("owlv2", top_k=K, model=detectors["owlv2"])
    assert isinstance(proposer, Owlv2ObjectnessProposer) and proposer.nms_iou == 0.5
    results = proposer.propose_scored(scenes)
    for scene, (boxes, scores) in zip(scenes, results):
        width, height = Image.open(scene).size
        assert_scored_valid(boxes, scores, width, height)
        assert all(box_iou(a, b) < 0.5 for i, a in enumerate(boxes) for b in boxes[i + 1:])
    # Each image is padded to its own square and resized, so a batch gives each image's own boxes, and the
    # boxes are the model's: sigmoid(objectness), box corners scaled by the longer side.
    assert proposer.propose_scored(scenes[1:]) == results[1:]
    from transformers import AutoImageProcessor, Owlv2ForObjectDetection

    model = Owlv2ForObjectDetection.from_pretrained(detectors["owlv2"]).eval()
    pixels = AutoImageProcessor.from_pretrained(detectors["owlv2"])(images=Image.open(scenes[0]).convert("RGB"),
                                                                    return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feature_map = model.image_embedder(pixel_values=pixels)[0]
        features = feature_map.reshape(1, -1, feature_map.shape[-1])
        objectness = torch.sigmoid(model.objectness_predictor(features))[0]
        centers = model.box_predictor(features, feature_map)[0]
    best = int(objectness.argmax())
    cx, cy, w, h = (centers[best] * 160).tolist()
    expected = [max(cx - w / 2, 0), max(cy - h / 2, 0), min(cx + w / 2, 160), min(cy + h / 2, 120)]
    assert results[0][1][0] == pytest.approx(float(objectness[best]))
    assert results[0][0][0] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="objectness"):
        from transformers import YolosForObjectDetection

        Owlv2ObjectnessProposer(YolosForObjectDetection.from_pretrained(detectors["yolos"]), image_processor=object())


def test_grounding_dino_is_prompted_with_the_type_words_and_returns_top_k(detectors, scenes):
    assert grounding_prompt(MQSPNConfig().type_verbalizers) == "person. location. organization. thing."
    assert grounding_prompt(["Art Music", "person", "person"]) == "art music. person."
    proposer = get_proposer("grounding-dino", top_k=K, model=detectors["grounding-dino"])
    assert isinstance(proposer, GroundingDinoProposer)
    assert proposer.prompt == "person. location. organization. thing."
    results = proposer.propose_scored(scenes)
    for scene, (boxes, scores) in zip(scenes, results):
        width, height = Image.open(scene).size
        assert_scored_valid(boxes, scores, width, height)
    custom = get_proposer("grounding-dino", top_k=2, model=detectors["grounding-dino"], type_words=["person"])
    assert custom.prompt == "person." and len(custom.propose(scenes[0])) <= 2
    with pytest.raises(ValueError, match="either prompt or type_words"):
        get_proposer("grounding-dino", model=detectors["grounding-dino"], prompt="person.", type_words=["person"])


@pytest.mark.skipif(not selective_search_available(), reason="OpenCV contrib (cv2.ximgproc) is not installed")
def test_selective_search_gives_rank_scores(scenes):
    proposer = get_proposer("selective-search", top_k=K)
    ((boxes, scores),) = proposer.propose_scored(scenes[:1])
    assert_scored_valid(boxes, scores, 160, 120)
    assert boxes == proposer.propose(scenes[0])


# --------------------------------------------------------------------------------------------------
# A folder of photos -> VinVL-layout files


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    paint_scene(folder / "a.jpg", 160, 120, seed=1)
    paint_scene(folder / "b.jpeg", 90, 140, seed=2)
    Image.open(paint_scene(folder / "c.jpg", 100, 80, seed=3)).convert("L").save(folder / "gray.jpg")
    os.remove(folder / "c.jpg")
    Image.new("RGB", HUGE, (90, 120, 200)).save(folder / "huge.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


class Counting:
    """A proposer wrapper counting the images it is asked about."""

    def __init__(self, inner):
        self.inner, self.images, self.nms_iou = inner, 0, inner.nms_iou

    def propose_scored(self, images, loaded=None):
        self.images += len(images)
        return self.inner.propose_scored(images, loaded=loaded)


def test_a_photo_folder_gets_one_loadable_file_per_readable_image_and_resumes(photos, tmp_path, detectors):
    out = tmp_path / "proposals"
    proposer = Counting(DetectorProposer(detectors["yolos"], top_k=K))
    summary = propose_folder(str(photos), str(out), proposer, batch_size=2, progress=False)

    readable = ["a.jpg", "b.jpeg", "gray.jpg", "huge.png"]
    assert sorted(p.name for p in out.glob("*.npz")) == sorted(f"{name}.npz" for name in readable)
    assert summary["images"] == 5 and summary["proposed"] == 4 and summary["failed"] == 1
    assert summary["failures"][0]["image"] == "corrupt.jpg" and "cannot be read" in summary["failures"][0]["error"]
    assert summary["ignored_files"] == 1 and summary["ignored_examples"] == ["notes.txt"]
    assert proposer.images == 4
    sizes = {"a.jpg": (160, 120), "b.jpeg": (90, 140), "gray.jpg": (100, 80), "huge.png": HUGE}
    total = 0
    for name, size in sizes.items():
        with np.load(out / f"{name}.npz", allow_pickle=False) as archive:
            assert set(archive.files) == {"num_boxes", "bounding_boxes", "scores"}
            assert archive["bounding_boxes"].dtype == np.float32 and archive["scores"].dtype == np.float32
        found = load_vinvl_proposals(str(out / f"{name}.npz"), top_k=K, image_size=size)
        assert found.dropped == {"non_finite": 0, "degenerate": 0, "duplicate": 0} and found.num_clipped == 0
        assert_scored_valid(found.boxes.tolist(), found.scores.tolist(), *size)
        total += len(found.boxes)
    assert summary["boxes"] == total
    # The VinVL proposer of the pipeline finds a file by the image's own name, .png included.
    np.testing.assert_allclose(VinVLProposer(str(out), top_k=K).propose(str(photos / "huge.png")),
                               load_vinvl_proposals(str(out / "huge.png.npz"), top_k=K).boxes)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["last_run"]["proposed"] == 4

    # A second run computes nothing (the corrupt image is counted again, the proposer never called).
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    again = propose_folder(str(photos), str(out), proposer, batch_size=2, progress=False)
    assert again["proposed"] == 0 and again["skipped_existing"] == 4 and again["failed"] == 1
    assert proposer.images == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == before

    # A kill mid-write leaves only a .partial file: it is removed, and the image is done again.
    os.remove(out / "a.jpg.npz")
    (out / "a.jpg.npz.4242.partial").write_bytes(b"half")
    resumed = propose_folder(str(photos), str(out), proposer, progress=False)
    assert resumed["proposed"] == 1 and resumed["removed_partial_files"] == 1 and proposer.images == 5
    assert not list(out.glob("*.partial"))

    # Other settings are refused instead of mixed in; --overwrite redoes everything.
    with pytest.raises(ValueError, match="other settings"):
        propose_folder(str(photos), str(out), GivenBoxesProposer([[0, 0, 5, 5]]), progress=False)
    redone = propose_folder(str(photos), str(out), GivenBoxesProposer([[0, 0, 5, 5]]), overwrite=True, progress=False)
    assert redone["proposed"] == 4
    assert load_vinvl_proposals(str(out / "a.jpg.npz")).boxes.tolist() == [[0, 0, 5, 5]]


def test_a_failing_image_is_isolated_from_its_batch(photos, tmp_path):
    class FailsOnB(GivenBoxesProposer):
        def _raw_detections(self, images, pils):
            if any(os.path.basename(i) == "b.jpeg" for i in images):
                raise RuntimeError("detector crashed on b")
            return super()._raw_detections(images, pils)

    out = tmp_path / "proposals"
    summary = propose_folder(str(photos), str(out), FailsOnB([[0, 0, 50, 50], [10, 10, 40, 40]]), batch_size=8,
                             progress=False)
    assert summary["proposed"] == 3 and summary["failed"] == 2
    assert {f["image"]: f["error"] for f in summary["failures"]}["b.jpeg"] == "RuntimeError: detector crashed on b"
    assert (out / "a.jpg.npz").is_file() and not (out / "b.jpeg.npz").exists()
    # Proposers without scores get rank scores: the file order is kept by a score-sorting reader.
    with np.load(out / "a.jpg.npz") as archive:
        assert archive["scores"].tolist() == [1.0, 0.5]


def test_a_write_that_fails_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "x.jpg.npz"

    def broken(handle, **arrays):
        handle.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        write_proposal_file(str(path), [[0, 0, 1, 1]], [1.0])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Coverage: the EEG / GMNER ceiling


def constructed_rows():
    # t1: the PER box is covered by the 2nd proposal at IoU exactly 0.5 (area 100 / union 200); no proposal
    # touches the LOC box; the ORG entity is not groundable and is ignored. t2: one PER box, covered exactly.
    return [
        {"id": "t1", "proposals": [[100, 100, 120, 120], [0, 0, 10, 20]],
         "entities": [{"start": 0, "end": 0, "type": "PER", "boxes": [[0, 0, 10, 10]]},
                      {"start": 1, "end": 1, "type": "LOC", "boxes": [[50, 50, 60, 60]]},
                      {"start": 2, "end": 2, "type": "ORG", "boxes": []}]},
        {"id": "t2", "proposals": [[5, 5, 25, 25]], "entities": [{"start": 0, "end": 1, "type": "PER",
                                                                   "boxes": [[5, 5, 25, 25], [0, 0, 2, 2]]}]},
    ]


def test_coverage_on_a_constructed_case_with_known_answers():
    rows = constructed_rows()
    full = proposal_coverage_of_rows(rows)
    assert (full["groundable"], full["covered"], full["uncovered"]) == (3, 2, 1)
    assert full["coverage"] == pytest.approx(2 / 3)
    assert full["per_type"] == {"LOC": {"groundable": 1, "covered": 0, "uncovered": 1, "coverage": 0.0},
                                "PER": {"groundable": 2, "covered": 2, "uncovered": 0, "coverage": 1.0}}
    assert full["recall_ceiling"] == pytest.approx(3 / 4)  # the ungroundable ORG entity is reachable
    # k = 1 keeps only t1's first proposal, which covers nothing.
    first = proposal_coverage_of_rows(rows, k=1)
    assert first["per_type"]["PER"]["covered"] == 1 and first["coverage"] == pytest.approx(1 / 3)

    report = coverage_report({"mine": rows}, ks=[2, 1])
    assert report["ks"] == [1, 2] and report["proposers"]["mine"]["2"]["coverage"] == pytest.approx(2 / 3)
    table = format_coverage_table(report).splitlines()
    assert table[1].split() == ["proposer", "k", "overall", "LOC", "PER", "covered", "of"]
    assert table[2].split() == ["mine", "1", "33.33", "0.00", "50.00", "1", "3"]
    assert table[3].split() == ["mine", "2", "66.67", "0.00", "100.00", "2", "3"]

    logged, echoed = [], []
    result = report_proposal_coverage({"train": rows}, 2, logged.append, echoed.append)
    assert logged == [{"event": "proposal_coverage", "step": 0, "k": 2, "splits": {"train": result["train"]}}]
    assert "cover 2 of 3 groundable entities" in echoed[0] and "66.67%" in echoed[0]


def write_release(folder, proposals_dir):
    """A two-tweet Twitter-GMNER release (CoNLL + xml) whose answers are those of constructed_rows."""
    (folder / "xml").mkdir(parents=True)
    (folder / "dev.txt").write_text(
        "IMGID:t1\nClark\tB-PER\nParis\tB-LOC\nACME\tB-ORG\n\nIMGID:t2\nLois\tB-PER\nLane\tI-PER\n\n", encoding="utf-8")
    objects = {"t1": [("Clark", (0, 0, 10, 10)), ("Paris", (50, 50, 60, 60))],
               "t2": [("Lois Lane", (5, 5, 25, 25)), ("Lois Lane", (0, 0, 2, 2))]}
    for sample_id, found in objects.items():
        body = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                       f"<ymax>{b[3]}</ymax></bndbox></object>" for name, b in found)
        (folder / "xml" / f"{sample_id}.xml").write_text(
            f"<annotation><size><width>200</width><height>200</height></size>{body}</annotation>", encoding="utf-8")
    proposals_dir.mkdir()
    for row in constructed_rows():
        write_proposal_file(str(proposals_dir / f"{row['id']}.jpg.npz"), row["proposals"],
                            [1.0 - 0.1 * i for i in range(len(row["proposals"]))])


def test_report_command_reads_a_release_s_xml_boxes(tmp_path, capsys):
    release, proposals = tmp_path / "release", tmp_path / "mine"
    write_release(release, proposals)
    script = load_propose_regions()
    out_json = tmp_path / "coverage.json"
    assert script.main(["--report", "--data_dir", str(release), "--split", "dev", "--proposals", f"mine={proposals}",
                        "--proposals", str(proposals), "--k", "1,2", "--report_json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "mine        1    33.33     0.00    50.00" in printed
    report = json.loads(out_json.read_text())
    assert set(report["proposers"]) == {"mine"}  # the bare folder is named after itself: the same name
    assert report["proposers"]["mine"]["2"]["per_type"]["PER"]["coverage"] == 1.0
    assert report["proposers"]["mine"]["2"]["coverage"] == pytest.approx(2 / 3)
    assert report["tweets_without_proposal_file"] == {"mine": 0}


def test_propose_command_writes_files_and_reports_their_coverage(photos, tmp_path, capsys, detectors):
    out = tmp_path / "proposals"
    script = load_propose_regions()
    code = script.main(["--images", str(photos), "--output", str(out), "--proposer", "owlv2", "--detector",
                        detectors["owlv2"], "--top_k", "3", "--batch_size", "3", "--device", "cpu", "--no_progress"])
    assert code == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out[: printed.out.rindex("}") + 1])
    assert summary["proposed"] == 4 and summary["failed"] == 1 and summary["settings"]["nms_iou"] == 0.5
    assert "failed: corrupt.jpg" in printed.err
    assert len(list(out.glob("*.npz"))) == 4
    # The huge photo was shrunk for the detector (max_side) and its boxes scaled back to its own pixels.
    huge = load_vinvl_proposals(str(out / "huge.png.npz"), top_k=3, image_size=HUGE)
    assert_scored_valid(huge.boxes.tolist(), huge.scores.tolist(), *HUGE, k=3)
    assert huge.boxes[:, 2].max() > 2000
    # Unknown combinations are refused before anything runs.
    with pytest.raises(SystemExit):
        script.main(["--images", str(photos), "--proposer", "owlv2"])


# --------------------------------------------------------------------------------------------------
# JSONL rows take their proposals from the folder


def test_jsonl_rows_read_proposals_from_a_proposals_folder(tmp_path):
    (tmp_path / "images").mkdir()
    paint_scene(tmp_path / "images" / "p1.png", 160, 120)
    proposals = tmp_path / "proposals"
    proposals.mkdir()
    write_proposal_file(str(proposals / "p1.png.npz"), [[10, 10, 60, 60], [0, 0, 500, 500]], [0.2, 0.9])
    rows = [{"id": "a", "text": "Clark in Paris", "entities": [{"start": 0, "end": 0, "type": "PER"}], "image": "images/p1.png"},
            {"id": "b", "text": "no photo here", "entities": []},
            {"id": "c", "text": "lost photo", "entities": [], "image": "images/gone.jpg"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dataset, report = load_jsonl(str(path), vinvl_dir=str(proposals))
    assert dataset[0]["proposals"] == [[0, 0, 160, 120], [10, 10, 60, 60]]  # by score, clipped to the image
    assert dataset[1]["proposals"] == [] and dataset[2]["proposals"] == []
    assert report.counts["missing_proposal_files"] == 1 and report.counts["clipped_proposals"] == 1
    path.write_text(json.dumps({**rows[0], "proposals": [[0, 0, 5, 5]]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.jsonl:1: the row has 'proposals' and a proposals folder"):
        load_jsonl(str(path), vinvl_dir=str(proposals))


# --------------------------------------------------------------------------------------------------
# Proposals made here train through examples/train.py --vinvl_dir


@pytest.mark.slow
def test_proposals_train_through_train_py_and_the_log_prints_their_ceiling(tmp_path, detectors):
    from transformers import BertTokenizerFast

    from modeling_mqspn.tools.demo_data import DemoDataConfig, generate_demo_release
    from test_train import TINY_MODEL, read_jsonl, run, train_command

    data = tmp_path / "data"
    generate_demo_release(data, seed=5, config=DemoDataConfig(num_train=8, num_dev=3, num_test=0, min_image_size=48,
                                                              max_image_size=64))
    words = {line.split("\t")[0].lower() for split in ("train", "dev")
             for line in (data / f"{split}.txt").read_text(encoding="utf-8").splitlines()
             if line and not line.startswith("IMGID:")}
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(tmp_path / "tokenizer")

    proposals = tmp_path / "proposals"
    summary = propose_folder(str(data / "images"), str(proposals), DetectorProposer(detectors["yolos"], top_k=6),
                             progress=False)
    assert summary["proposed"] == 11 and summary["failed"] == 0

    out = tmp_path / "run"
    demo = {"root": tmp_path, "data": data, "tokenizer": tmp_path / "tokenizer"}
    done = run(train_command(demo, out, "--num_epochs", "1", "--vinvl_dir", str(proposals),
                             "--model_config", json.dumps({**TINY_MODEL, "max_regions": 6})))
    # The run saw exactly the files' boxes (not the release's own vinvl/ folder) ...
    references = {row["id"]: row for row in read_jsonl(out / "dev_references.jsonl")}
    for sample_id, row in references.items():
        image_size = Image.open(data / "images" / f"{sample_id}.jpg").size
        expected = load_vinvl_proposals(str(proposals / f"{sample_id}.jpg.npz"), top_k=6, image_size=image_size).boxes
        np.testing.assert_allclose(row["proposals"], expected, rtol=0, atol=1e-4)
    # ... and its log gives their coverage ceiling, per split, as the coverage of those references.
    (logged,) = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "proposal_coverage"]
    assert logged["k"] == 6 and {"train", "dev"} <= set(logged["splits"])
    assert logged["splits"]["dev"] == proposal_coverage_of_rows(list(references.values()), 6)
    assert "dev: proposals (k=6) cover" in done.stdout
    assert (out / "best" / "model.safetensors").is_file()


def test_the_pipeline_prompts_grounding_dino_with_the_model_s_type_words(detectors, scenes):
    from transformers import pipeline

    from modeling_mqspn import GROUNDED_NER_TASK
    from test_pipeline import tiny_model_and_processor

    model, processor = tiny_model_and_processor()
    model.config.type_verbalizers = ["human", "place", "company", "other"]
    ner = pipeline(GROUNDED_NER_TASK, model=model, processor=processor, device="cpu", proposer="grounding-dino",
                   proposer_kwargs={"model": detectors["grounding-dino"]})
    proposer = ner._preprocess_params["proposer"]
    assert proposer.prompt == "human. place. company. thing." and proposer.top_k == model.config.max_regions
    assert isinstance(ner({"text": "Messi lands in Paris", "image": scenes[0]}), list)


def test_the_training_log_says_when_a_split_has_nothing_to_ground():
    echoed = []
    report_proposal_coverage({"test": [{"id": "x", "proposals": [], "entities": []}]}, 18, lambda record: None, echoed.append)
    assert echoed == ["test: no groundable gold entity, so the proposals put no ceiling on grounding"]
